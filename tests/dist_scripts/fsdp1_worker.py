"""One rank of the FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) checks, on gloo/CPU.

Usage: ``python fsdp1_worker.py RANK WORLD PORT OUT_DIR`` (the test starts one per rank).

Every rank trains on its half of the global batch (rank r: samples r, r+W, ... of the
first ``GLOBAL_BATCH``), FSDP averages the gradients, and the library sees only local
shards. The rank writes ``OUT_DIR/rank{r}.pt``: the norms the library returned, the
naive norm of the local shards, and the whole parameters (and gradients where FSDP can
gather them) after one clipped SGD step. The test compares them with a plain-torch
single-process reference over the whole global batch.
"""

from __future__ import annotations

import math
import os
import sys
import types
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common as C

from lightning_l0l1.clipper import GradientClipper
from lightning_l0l1.functional import clip_gradients_, grad_norm

NORM_TYPES = (2.0, 1.0, math.inf)


def wrap(use_orig_params: bool, strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD) -> FSDP:
    # Each Linear its own FSDP unit (two flat parameters), under a root without parameters.
    return FSDP(
        C.make_net(),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        sharding_strategy=strategy,
    )


def backward(model: FSDP, rank: int, world: int) -> None:
    x, y = C.make_data()
    idx = list(range(rank, C.GLOBAL_BATCH, world))
    model.zero_grad(set_to_none=True)
    C.loss_fn(model, x[idx], y[idx]).backward()


def full_params(model: FSDP) -> list[torch.Tensor]:
    with FSDP.summon_full_params(model):
        return [p.detach().clone() for p in model.parameters()]


def full_grads(model: FSDP) -> list[torch.Tensor]:
    with FSDP.summon_full_params(model, with_grads=True):
        return [p.grad.detach().clone() for p in model.parameters()]


def local_norm(model: FSDP) -> float:
    gs = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gs])))


def functional_case(use_orig_params: bool, rank: int, world: int) -> dict[str, Any]:
    model = wrap(use_orig_params)
    pg = model.process_group
    backward(model, rank, world)
    out: dict[str, Any] = {
        "flat_param_types": sorted({type(p).__name__ for p in model.parameters()}),
        "norms": {p: float(grad_norm(model.parameters(), p, process_group=pg)) for p in NORM_TYPES},
        "naive": local_norm(model),
        "naive_lib": float(grad_norm(model.parameters())),
    }
    opt = torch.optim.SGD(model.parameters(), lr=C.LR)
    out["clip_returned"] = float(clip_gradients_(model.parameters(), C.MAX_NORM, process_group=pg))
    if use_orig_params:  # FSDP gathers gradients only for use_orig_params=True
        out["grads"] = full_grads(model)
    opt.step()
    out["params"] = full_params(model)
    return out


def clipper_case(use_orig_params: bool, rank: int, world: int, strategy: ShardingStrategy) -> dict[str, Any]:
    """The callback's internal path: GradientClipper.step with the FSDP1 group and shard predicate."""
    model = wrap(use_orig_params, strategy)
    opt = torch.optim.SGD(model.parameters(), lr=C.LR)
    backward(model, rank, world)
    outcome = GradientClipper("clip", max_norm=C.MAX_NORM).step(
        opt, process_group=model.process_group, is_shard=lambda p: getattr(p, "_fsdp_flattened", False)
    )
    opt.step()
    return {"norm": float(outcome.norm), "params": full_params(model)}


def callback_case(use_orig_params: bool, rank: int, world: int, strategy: ShardingStrategy) -> dict[str, Any]:
    """The callback's own hook on a stand-in trainer that holds the FSDP1 model (no Lightning strategy)."""
    from lightning_l0l1.callback import L0L1Clipping, _find_fsdp1_group

    model = wrap(use_orig_params, strategy)
    found = _find_fsdp1_group(model)
    opt = torch.optim.SGD(model.parameters(), lr=C.LR)
    trainer = types.SimpleNamespace(
        optimizers=[opt],
        precision_plugin=types.SimpleNamespace(),
        strategy=types.SimpleNamespace(model=model),
        global_step=0,
        gradient_clip_val=None,
    )
    cb = L0L1Clipping(mode="clip", max_norm=C.MAX_NORM)
    cb.setup(trainer, None, "fit")  # type: ignore[arg-type]
    backward(model, rank, world)
    cb.on_before_optimizer_step(trainer, None, opt)  # type: ignore[arg-type]
    opt.step()
    return {
        "found": "none" if found is None else ("fsdp_group" if found[0] is model.process_group else "other"),
        "found_plain": _find_fsdp1_group(C.make_net()),
        "norm": cb.latest()["l0l1/grad_norm"],
        "params": full_params(model),
    }


def head_only_case(which: str, rank: int, world: int) -> dict[str, Any]:
    """Clip only the last layer's gradients, which lie wholly in the last rank's shard.

    One FSDP unit, ``use_orig_params=True`` (Lightning's default): on rank 0 the head's
    parameters are empty views with ``grad=None``, yet rank 0 must join the all-reduce.
    """
    model = FSDP(C.make_net(), device_id=torch.device("cpu"), use_orig_params=True)
    head = [p for name, p in model.named_parameters() if ".2." in name]
    opt = torch.optim.SGD(head, lr=C.LR)
    backward(model, rank, world)
    local = [p.grad is not None for p in head]
    if which == "clipper":
        outcome = GradientClipper("clip", max_norm=C.MAX_NORM).step(
            opt, process_group=model.process_group, is_shard=lambda p: getattr(p, "_fsdp_flattened", False)
        )
        norm = None if outcome is None else float(outcome.norm)
    else:
        norm = float(clip_gradients_(head, C.MAX_NORM, process_group=model.process_group))
    opt.step()
    return {"local_grads": local, "norm": norm, "params": full_params(model)}


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    # A collective that one rank skips fails after the timeout instead of hanging.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        res: dict[str, Any] = {"rank": rank, "world": dist.get_world_size()}
        for uop in (False, True):
            res[f"functional_uop{uop}"] = functional_case(uop, rank, world)
            res[f"clipper_uop{uop}"] = clipper_case(uop, rank, world, ShardingStrategy.FULL_SHARD)
            res[f"callback_uop{uop}"] = callback_case(uop, rank, world, ShardingStrategy.FULL_SHARD)
        res["callback_noshard"] = callback_case(True, rank, world, ShardingStrategy.NO_SHARD)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(res, path)
        # Last, as a rank that skips the all-reduce derails every later collective.
        for which in ("clipper", "functional"):
            try:
                res[f"head_{which}"] = head_only_case(which, rank, world)
            except Exception as err:  # recorded for the test, which reports it
                res[f"head_{which}"] = {"error": f"{type(err).__name__}: {err}"}
                torch.save(res, path)
                os._exit(0)  # the process group is unusable now: do not wait on it
        torch.save(res, path)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every result is saved and every rank is past the barrier: leave without tearing gloo down. Its
    # teardown at exit sometimes aborts a rank ("terminate called without an active exception", exit -6)
    # after the work is done, which would fail the test on nothing it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
