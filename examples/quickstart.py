"""Quickstart: train a small LSTM language model with `L0L1Clipping` and print what it did.

    python examples/quickstart.py            # ~1 minute on a 2-core CPU
    python examples/quickstart.py --help

The text is the English documentation that ships with Python (`pydoc_data.topics`),
so nothing is downloaded. Plain SGD at a large learning rate with hard clipping.
"""

from __future__ import annotations

import argparse
import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_l0l1 import L0L1Clipping


def char_data(seq_len: int, n_seqs: int) -> tuple[TensorDataset, int]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text[: seq_len * n_seqs + 1]])
    x = ids[:-1].view(n_seqs, seq_len)
    y = ids[1:].view(n_seqs, seq_len)
    return TensorDataset(x, y), len(vocab)


class CharLSTM(pl.LightningModule):
    def __init__(self, vocab: int, hidden: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.lstm(self.embed(x))
        loss = nn.functional.cross_entropy(self.head(out).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="clip", choices=["clip", "adaptive", "l0l1"])
    parser.add_argument("--max-norm", type=float, default=0.5, help="gamma for clip/adaptive")
    parser.add_argument("--l0", type=float, default=1.0, help="L0 for mode=l0l1")
    parser.add_argument("--l1", type=float, default=0.5, help="L1 for mode=l0l1")
    parser.add_argument("--lr", type=float, default=5.0, help="SGD learning rate (large on purpose)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    ds, vocab = char_data(args.seq_len, args.seqs)
    model = CharLSTM(vocab, args.hidden, args.lr)
    clip = L0L1Clipping(mode=args.mode, max_norm=args.max_norm, l0=args.l0, l1=args.l1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[clip],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(ds, batch_size=32, shuffle=True))
    stats = clip.latest()
    loss = float(trainer.callback_metrics["train_loss"])
    print("\nL0L1Clipping summary")
    print(f"  mode                 {args.mode}")
    print(f"  optimizer steps      {int(stats['l0l1/steps'])}")
    print(f"  clip rate            {stats['l0l1/clip_rate']:.2f}")
    print(f"  last grad norm       {stats['l0l1/grad_norm']:.4g} -> {stats['l0l1/grad_norm_scaled']:.4g}")
    print(f"  threshold in use     {stats['l0l1/max_norm']:.4g}")
    print(f"  effective lr         {stats['l0l1/lr_effective']:.4g} (lr {args.lr})")
    print(f"  non-finite steps     {int(stats['l0l1/nonfinite_steps'])}")
    print(f"  final train loss     {loss:.4f} (uniform guess: {math.log(vocab):.4f})")
    return stats


if __name__ == "__main__":
    main()
