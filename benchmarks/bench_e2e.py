"""Share of a real training step that the callback takes: a small LSTM language model, Trainer, CPU.

Each configuration trains for a few steps in turn (round robin, so the machine's drift hits all
alike); the table gives the median time of an optimizer step (forward, backward, callback, SGD)
and the extra time against the run without clipping.

    python benchmarks/bench_e2e.py            # full
    python benchmarks/bench_e2e.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, table

from lightning_l0l1 import L0L1Clipping


class LSTMLM(pl.LightningModule):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.lstm(self.embed(x))
        return nn.functional.cross_entropy(self.head(out).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t0)


def one_run(make_cbs, clip_val, model, data, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[*make_cbs(), timer], gradient_clip_val=clip_val,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16))
    return timer.times[1:]  # the first step includes warm-up


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_e2e.md")
    args = ap.parse_args(argv)
    hidden, seq, rounds, steps = (32, 16, 1, 3) if args.quick else (256, 64, 8, 12)
    vocab = 96
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (16 * (steps + 1), seq + 1), generator=g)
    data = TensorDataset(ids[:, :-1], ids[:, 1:])
    torch.manual_seed(0)
    model = LSTMLM(vocab, hidden)
    n_params = sum(p.numel() for p in model.parameters())
    configs = {
        "no clipping": (lambda: [], None),
        "Lightning gradient_clip_val": (lambda: [], 1.0),
        "L0L1 clip": (lambda: [L0L1Clipping(mode="clip", max_norm=1.0)], None),
        "L0L1 clip, propagate": (lambda: [L0L1Clipping(mode="clip", max_norm=1.0, nonfinite="propagate")], None),
        "L0L1 adaptive": (lambda: [L0L1Clipping(mode="adaptive", max_norm=1.0)], None),
        "L0L1 l0l1": (lambda: [L0L1Clipping(mode="l0l1", l0=1.0, l1=1.0)], None),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for name, (cbs, clip_val) in configs.items():
                times[name] += one_run(cbs, clip_val, model, data, steps)
    base = statistics.median(times["no clipping"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append([name, med * 1e3, (med - base) * 1e3, 100 * (med - base) / base, len(ts)])
    report = (
        f"Machine: {machine()}\n\nLSTM LM, 2 layers, hidden {hidden}, {n_params / 1e6:.2f}M parameters, "
        f"batch 16 x {seq} tokens, SGD\n\n"
        + table(["configuration", "step ms (median)", "extra ms", "extra % of step", "steps timed"], rows)
        + "\n"
    )
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
