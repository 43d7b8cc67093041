"""The first steps of Lightning's own LSTM demo (``pytorch_lightning.demos.lstm``) under each clipping rule.

The demo's model (``SimpleLSTM``: 4 LSTM layers of 512, word embeddings, dropout 0.2), its batching
(``SequenceSampler``, batch 20, hidden state carried across batches) and its optimizer (SGD, lr 20),
on the words of Python's ``pydoc_data.topics`` instead of WikiText-2 (nothing is downloaded). The
clipped runs go through a ``lightning.pytorch`` ``Trainer`` with the :class:`L0L1Clipping` callback, the
path users run (``--via loop``: a plain loop around :class:`lightning_l0l1.GradientClipper`, the same
losses bit for bit). The table gives the highest loss of the first 10 and of the first 20 steps (a
spike while ``auto``'s estimate forms would show there) and the mean loss of the last 10 steps.

    python benchmarks/bench_lstm_demo.py             # 50 steps, one seed (about 10 minutes on 2 cores)
    python benchmarks/bench_lstm_demo.py --quick     # smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _via
from _common import emit, machine, table

GRID = (0.1, 0.25, 0.5, 1.0)


def dataset(block: int = 35):
    from pydoc_data.topics import topics

    from pytorch_lightning.demos.transformer import WikiText2

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wikitext-2.txt").write_text("\n".join(topics[k] for k in sorted(topics)))
        return WikiText2(Path(tmp), block_size=block, download=False)


def train(config: str, seed: int, data, args) -> list[float]:
    from pytorch_lightning.demos.lstm import SequenceSampler, SimpleLSTM

    torch.manual_seed(seed)
    model = SimpleLSTM(vocab_size=data.vocab_size, ninp=args.width, nhid=args.width, nlayers=args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    clipper = None
    if config == "auto":
        clipper = {"mode": "auto"}
    elif config.startswith("clip="):
        clipper = {"mode": "clip", "max_norm": float(config.split("=")[1])}
    loader = torch.utils.data.DataLoader(data, batch_sampler=SequenceSampler(data, batch_size=args.batch))
    carried: dict[str, Any] = {}

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:  # the demo's: the hidden state carried across batches
        x, y = batch
        hidden = carried.get("hidden") or model.init_hidden(x.size(0))
        out, hidden = model(x, (hidden[0].detach(), hidden[1].detach()))
        carried["hidden"] = hidden
        return F.nll_loss(out, y.reshape(-1))

    return _via.run(model, opt, loader, loss_fn, clipper, getattr(args, "via", "loop"), args.steps)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--configs", type=str, default=None)
    ap.add_argument("--via", choices=_via.VIA, default="lightning",
                    help="how the clipped runs run: a Trainer with the L0L1Clipping callback (default), or a plain "
                         "loop around GradientClipper")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_lstm_demo.md")
    args = ap.parse_args(argv)
    configs = ["unclipped", *[f"clip={t:g}" for t in GRID], "auto"]
    if args.quick:
        args.steps, args.seeds, args.width, args.layers, args.batch = 4, 1, 16, 1, 4
        configs = ["clip=0.25", "auto"]
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    torch.set_num_threads(2)
    data = dataset()
    t0 = time.time()
    runs: dict[str, list[list[float]]] = {c: [] for c in configs}
    for seed in range(args.seeds):
        for c in configs:
            runs[c].append(train(c, seed, data, args))
            print(f"seed {seed} {c}: first 10 max {max(runs[c][-1][:10]):.2f}, first 20 max "
                  f"{max(runs[c][-1][:20]):.2f}, last {runs[c][-1][-1]:.3f}", flush=True)

    def final(ls: list[float]) -> float:
        tail = ls[-max(1, len(ls) // 5):]
        return statistics.mean(tail) if len(ls) == args.steps and all(map(math.isfinite, tail)) else math.inf

    means = {c: statistics.mean(final(r) for r in rs) for c, rs in runs.items()}
    clips = [c for c in configs if c.startswith("clip=")]
    best = min(clips, key=lambda c: means[c]) if clips else None
    rows = []
    for c in configs:
        spike = statistics.mean(max(r[:10]) for r in runs[c])
        spike20 = statistics.mean(max(r[:20]) for r in runs[c])
        start = statistics.mean(r[0] for r in runs[c])
        rows.append([c, f"{start:.2f}", f"{spike:.2f}", f"{spike20:.2f}", f"{means[c]:.3f}",
                     f"{means[c] / means[best]:.3f}" if best and math.isfinite(means[c]) else "-"])
    from pytorch_lightning.demos.lstm import SimpleLSTM

    model = SimpleLSTM(vocab_size=data.vocab_size, ninp=args.width, nhid=args.width, nlayers=args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    report = (
        f"Machine: {machine()}\n\nLightning's LSTM demo model (SimpleLSTM, {args.layers} layers of {args.width}, "
        f"{n_params / 1e6:.1f}M parameters) on the {data.vocab_size}-word vocabulary of pydoc_data.topics, SGD lr "
        f"{args.lr:g}, batch {args.batch} x 35 words with the hidden state carried, {args.steps} steps, "
        f"{args.seeds} seeds, clipped runs via {args.via}; {time.time() - t0:.0f} s\n\n"
        + table(["configuration", "loss at step 0", "highest loss, steps 0-9", "steps 0-19",
                 f"mean loss, last {max(1, args.steps // 5)} steps", "/ best threshold"], rows)
        + "\n"
    )
    return emit(report, args.out, args.quick)


if __name__ == "__main__":
    main()
