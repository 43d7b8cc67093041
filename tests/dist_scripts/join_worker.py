"""One rank of a plain DDP loop with uneven inputs under ``torch.distributed.algorithms.join.Join``.

Usage: ``python join_worker.py RANK WORLD PORT OUT_DIR``. Rank r trains on ``JOIN_STEPS[r]`` batches
(uneven) through ``GradientClipper()`` (``auto``) with ``agree=AllRanksFinite()`` listed in ``Join``
after the DDP model; rank 0 goes on alone once rank 1 has joined. Writes ``OUT_DIR/rank{r}.pt``: the
parameters at the end and the norms the clipper saw.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C

from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.join import AllRanksFinite

JOIN_STEPS = (6, 3)  # per rank: rank 1 runs out of data after 3 steps


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = C.make_data()
    i = (step * C.WORLD + rank) * C.MICRO_BATCH
    return x[i : i + C.MICRO_BATCH], y[i : i + C.MICRO_BATCH]


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model = DDP(C.make_net())
    opt = torch.optim.SGD(model.parameters(), lr=C.LR)
    clipper, agree = GradientClipper(), AllRanksFinite()
    norms = []
    with Join([model, agree]):
        for step in range(JOIN_STEPS[rank]):
            opt.zero_grad()
            C.loss_fn(model, *batch(rank, step)).backward()
            out = clipper.step(opt, agree=agree)
            assert out is not None
            norms.append(float(out.norm))
            opt.step()
    torch.save({"params": [p.detach().clone() for p in model.module.parameters()], "norms": norms},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
