"""Multi-process checks: the global norm is global under DDP, FSDP2 (ModelParallelStrategy) and FSDP1.

Every number is compared with a single-process, plain-torch reference over the same
global batch (``clip_grad_norm_`` then SGD), computed here in the test process; for the
sharded strategies the test also shows that the naive norm of the local shards differs
from that reference, so the assertions on the library can fail.

Process layout (2 CPU processes each, gloo), started together by one module fixture so
their start-up overlaps:

* ``dist_scripts/lightning_train.py OUT ddp``: ``strategy="ddp"`` must run from a script,
  because Lightning's launcher re-executes the command line for rank 1 (inside pytest it
  would re-run pytest);
* ``dist_scripts/lightning_train.py OUT fsdp2``: ``ModelParallelStrategy`` + ``fully_shard``;
* ``dist_scripts/lightning_train.py OUT fsdp2 auto``: the same with ``L0L1Clipping()`` (``auto``), whose
  secant pairs need global norms of the gradient and parameter *differences* over the shards;
* ``dist_scripts/fsdp1_worker.py`` x 2: torch's ``FullyShardedDataParallel`` on the CPU,
  without Lightning (its ``FSDPStrategy`` needs GPUs).

``ddp_fork`` runs in this process: the parent's callback object is not the one that
trained, so the workers report through files.

Lightning's training sampler is a shuffling ``DistributedSampler`` even for a
``shuffle=False`` loader, so the scripts record the sample indices each rank trained on
and the reference assembles every global batch from them.

FSDP1 edge cases: ``NO_SHARD`` units (whole gradients, nothing to sum over the group) and
a rank whose shard holds none of the clipped gradients (it must still join the all-reduce).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from _procs import clean_env, fork_env, free_ports

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
TIMEOUT_S = 240.0

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the scripts `import dist_common` by this name: share one module
    spec.loader.exec_module(module)
    return module


C = _load("dist_common")


# ---------------------------------------------------------------------------------------- processes
class _Job:
    """Processes started now, waited for (with a deadline) when a test needs their files."""

    def __init__(self, name: str, cmds: list[list[str]], out_dir: Path, port: int, n_ranks: int) -> None:
        self.name, self.out_dir, self.n_ranks = name, out_dir, n_ranks
        self.deadline = time.monotonic() + TIMEOUT_S
        self.logs = [out_dir / f"log{i}.txt" for i in range(len(cmds))]
        self.procs = []
        env = clean_env(port)
        for cmd, log in zip(cmds, self.logs):
            with open(log, "wb") as fh:
                # A new session per process: on a timeout the whole tree (Lightning's rank-1 child too) is killed.
                self.procs.append(
                    subprocess.Popen(
                        cmd, cwd=out_dir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        self._outs: list[dict[str, Any]] | None = None

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:  # pragma: no cover - already gone
                    pass
                p.wait()

    def _log_tail(self) -> str:
        tails = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            tails.append(f"----- {log.name} -----\n{text[-4000:]}")
        return "\n".join(tails)

    def outputs(self) -> list[dict[str, Any]]:
        if self._outs is not None:
            return self._outs
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name}: timed out after {TIMEOUT_S:.0f} s\n{self._log_tail()}")
        codes = [p.returncode for p in self.procs]
        if any(codes):
            pytest.fail(f"{self.name}: exit codes {codes}\n{self._log_tail()}")
        files = [self.out_dir / f"rank{r}.pt" for r in range(self.n_ranks)]
        missing = [f.name for f in files if not f.exists()]
        assert not missing, f"{self.name}: missing {missing}\n{self._log_tail()}"
        self._outs = [torch.load(f, weights_only=False) for f in files]
        return self._outs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory):
    started: dict[str, _Job] = {}
    ddp_port, fsdp2_port, fsdp2_auto_port, fsdp1_port, join_port = free_ports(5)
    try:
        for name, args, port in (
            ("ddp", ["ddp"], ddp_port),
            ("fsdp2", ["fsdp2"], fsdp2_port),
            ("fsdp2_auto", ["fsdp2", "auto"], fsdp2_auto_port),
        ):
            out = tmp_path_factory.mktemp(name)
            cmd = [sys.executable, str(SCRIPTS / "lightning_train.py"), str(out), *args]
            started[name] = _Job(name, [cmd], out, port, C.WORLD)
        out = tmp_path_factory.mktemp("fsdp1")
        port = fsdp1_port
        cmds = [
            [sys.executable, str(SCRIPTS / "fsdp1_worker.py"), str(r), str(C.WORLD), str(port), str(out)]
            for r in range(C.WORLD)
        ]
        started["fsdp1"] = _Job("fsdp1", cmds, out, port, C.WORLD)
        out = tmp_path_factory.mktemp("join")
        cmds = [
            [sys.executable, str(SCRIPTS / "join_worker.py"), str(r), str(C.WORLD), str(join_port), str(out)]
            for r in range(C.WORLD)
        ]
        started["join"] = _Job("join", cmds, out, join_port, C.WORLD)
        yield started
    finally:
        for job in started.values():
            job.kill()


# ---------------------------------------------------------------------------------------- references
def _close(actual: Any, expected: Any, rtol: float, atol: float = 0.0, what: str = "") -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def _params_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}: parameter {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{what}, parameter {i}: {m}")


def _grad_norm_of(batch: list[int]) -> float:
    """Plain torch: the norm of the first step's gradient of the mean loss over ``batch``."""
    x, y = C.make_data()
    net = C.make_net()
    C.loss_fn(net, x[batch], y[batch]).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))


def _check_lightning_run(outs: list[dict[str, Any]], *, sharded: bool) -> None:
    """Every rank's record against the single-process reference over the same global batches."""
    assert sorted(o["rank"] for o in outs) == list(range(C.WORLD))
    assert all(o["world"] == C.WORLD and o["global_step"] == C.STEPS for o in outs)

    # The global batches, from what the ranks trained on: each sample once, no overlap between ranks.
    seen = [o["seen"] for o in sorted(outs, key=lambda o: o["rank"])]
    for rank_batches in seen:
        assert len(rank_batches) == C.STEPS * C.ACCUMULATE
        assert all(len(b) == C.MICRO_BATCH for b in rank_batches)
    flat = sorted(i for rank_batches in seen for b in rank_batches for i in b)
    assert flat == list(range(C.N))
    batches = C.global_batches(seen)
    ref = C.reference_training(batches)
    # Clipping is active at every step, far from the threshold: the scale matters.
    assert all(n > 4 * C.MAX_NORM for n in ref["norms"]), ref["norms"]
    # A norm over one rank's samples only is far from the global one: the check below can tell them apart.
    first_rank_only = [i for b in seen[0][: C.ACCUMULATE] for i in b]
    assert abs(_grad_norm_of(first_rank_only) / ref["norms"][0] - 1) > 0.05

    for o in outs:
        r = o["rank"]
        assert o["dtensor_grads"] == [sharded] * C.STEPS, f"rank {r}: gradient types {o['dtensor_grads']}"
        # The plain-torch norm of the whole gradient the callback received: validates the batch composition.
        _close(o["true_pre"], ref["norms"], 1e-4, what=f"rank {r}: whole gradient before the callback")
        # What the callback computed and reports, on every rank.
        _close(o["cb_norm"], ref["norms"], 1e-4, what=f"rank {r}: l0l1/grad_norm")
        expected_scale = [min(1.0, C.MAX_NORM / (n + 1e-6)) for n in ref["norms"]]
        _close(o["cb_scale"], expected_scale, 1e-4, what=f"rank {r}: l0l1/scale")
        _close(o["cb_scaled"], ref["post"], 1e-4, what=f"rank {r}: l0l1/grad_norm_scaled")
        # What it did to the gradients (measured by plain torch on the whole gradient) and to the parameters.
        _close(o["true_post"], ref["post"], 1e-4, what=f"rank {r}: whole gradient after the callback")
        _params_close(o["params"], ref["params"], f"rank {r}: final parameters")
        assert o["latest"]["l0l1/steps"] == C.STEPS
        assert o["latest"]["l0l1/clip_rate"] == 1.0
        if sharded:
            # The naive norm of the local shards is wrong on every rank and step.
            for step, (naive, want) in enumerate(zip(o["naive_pre"], ref["norms"])):
                assert naive < want * 0.95, f"rank {r}, step {step}: local-shard norm {naive} vs global {want}"
    p0, p1 = outs[0]["params"], outs[1]["params"]
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "parameters differ between ranks"


def _check_auto_run(outs: list[dict[str, Any]]) -> None:
    """``auto`` on every rank against ``GradientClipper()`` in one process over the same global batches:
    the norm, the estimator (secant smoothness, L0, L1), the threshold and step it chose, the final
    parameters; and its checkpointed state (the window, the envelope, the snapshot's norm) equal on all ranks."""
    from lightning_l0l1 import GradientClipper

    seen = [o["seen"] for o in sorted(outs, key=lambda o: o["rank"])]
    ref = C.reference_auto(C.global_batches(seen), GradientClipper())
    stats = ref["stats"]
    assert stats["l0l1/smoothness_pairs"][-1] == C.STEPS - 1  # every step after the first formed a pair
    assert all(math.isfinite(v) and v > 0 for v in stats["l0l1/smoothness"][1:])
    for o in outs:
        r = o["rank"]
        _close(o["cb_norm"], stats["l0l1/grad_norm"], 1e-4, what=f"rank {r}: l0l1/grad_norm")
        for key in ("smoothness", "L0", "L1", "max_norm", "lr_effective"):
            _close(o[f"cb_{key}"], stats[f"l0l1/{key}"], 1e-4, what=f"rank {r}: l0l1/{key}")
        _params_close(o["params"], ref["params"], f"rank {r}: final parameters")
    st0, st1 = (o["state"]["clipper"]["optimizers"][0] for o in sorted(outs, key=lambda o: o["rank"]))
    assert st0["env"].keys() == st1["env"].keys() and "window" in st0["env"]
    for k in st0["env"]:  # NaN marks the window's empty slots
        a, b = torch.as_tensor(st0["env"][k]), torch.as_tensor(st1["env"][k])
        assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)), f"env[{k!r}] differs between ranks"
    assert (st0["delta"], st0["last"], st0["steps"]) == (st1["delta"], st1["last"], st1["steps"])


# ---------------------------------------------------------------------------------------- DDP
def test_ddp_subprocess_norm_and_params_match_single_process_reference(jobs: dict[str, _Job]) -> None:
    outs = jobs["ddp"].outputs()
    _check_lightning_run(outs, sharded=False)
    for out in outs:  # DDP grads are already all-reduced: the norm needs none; one 1-element verdict all-reduce
        assert out["all_reduces"] == [1] * len(out["cb_norm"])


def test_ddp_fork_in_process_matches_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ddp_fork`` from this process (workers forked, no re-import); results come back through files."""
    fork_env(monkeypatch)
    lightning_train = _load("lightning_train")
    trainer = lightning_train.run(str(tmp_path), "ddp_fork")
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    _check_lightning_run(outs, sharded=False)
    # The parent got rank 0's weights back from the launcher, not its callback state.
    seen = [o["seen"] for o in sorted(outs, key=lambda o: o["rank"])]
    ref = C.reference_training(C.global_batches(seen))
    _params_close([p.detach() for p in trainer.lightning_module.net.parameters()], ref["params"], "parent module")


@pytest.mark.parametrize("sampled", [False, True], ids=["small-tensors-whole", "sampling"])
def test_auto_under_ddp_fork_matches_a_single_process_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampled: bool
) -> None:
    """With ``sampling``, blocks of 4 elements and at least 4 of them make the sampled snapshot sample every
    tensor of the test model (in the forked workers and in the reference alike): the ranks sample the same
    elements with no communication, and match the single-process run."""
    fork_env(monkeypatch)
    if sampled:
        from lightning_l0l1 import snapshots

        monkeypatch.setattr(snapshots, "SAMPLE_BLOCK", 4)
        monkeypatch.setattr(snapshots, "SAMPLE_MIN_BLOCKS", 4)
    _load("lightning_train").run(str(tmp_path), "ddp_fork", "auto")
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    _check_auto_run(outs)
    for out in outs:  # replicated gradients: the estimator's norms need no communication either (1: the verdict)
        assert out["all_reduces"] == [1] * C.STEPS


@pytest.mark.parametrize("sync_nonfinite", [None, False])
def test_a_gradient_non_finite_on_one_rank_only_is_skipped_on_every_rank(
    sync_nonfinite: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's gradient turns NaN after DDP's all-reduce at step 2. By default the ranks agree on the verdict
    (one 1-element all-reduce): both skip, and the replicas stay equal. Without it (`sync_nonfinite=False`)
    only rank 1 skips and the replicas part: the failure the default prevents."""
    fork_env(monkeypatch)
    _load("lightning_train").run(str(tmp_path), "ddp_fork", "clip", nan_rank=1, sync_nonfinite=sync_nonfinite)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD))
    counts = (r0["latest"]["l0l1/nonfinite_steps"], r1["latest"]["l0l1/nonfinite_steps"])
    same = all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    if sync_nonfinite is None:
        assert counts == (1, 1) and same
        assert r0["all_reduces"] == r1["all_reduces"] == [1] * C.STEPS
    else:
        assert counts == (0, 1) and not same
        assert r0["all_reduces"] == [0] * C.STEPS


def test_uneven_inputs_under_join_with_the_joinable_verdict(jobs: dict[str, _Job]) -> None:
    """A plain DDP loop under ``Join`` with uneven inputs (rank 0: 6 batches, rank 1: 3) and
    ``agree=AllRanksFinite()`` listed in ``Join``: both ranks finish (rank 1 shadows the verdict's
    all-reduce while rank 0 goes on), and rank 0's norms and final parameters equal ``GradientClipper()``
    in one process fed what DDP gives it: the mean gradient of both ranks' batches for 3 steps, then
    rank 0's alone divided by the initial world size (rank 1 adds zeros)."""
    from lightning_l0l1 import GradientClipper

    join = _load("join_worker")
    r0, r1 = jobs["join"].outputs()
    net = C.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=C.LR)
    clipper, norms = GradientClipper(), []
    for step in range(join.JOIN_STEPS[0]):
        grads = [torch.zeros_like(p) for p in net.parameters()]
        for rank in range(C.WORLD):
            if step < join.JOIN_STEPS[rank]:
                net.zero_grad()
                C.loss_fn(net, *join.batch(rank, step)).backward()
                grads = [g + p.grad / C.WORLD for g, p in zip(grads, net.parameters())]
        for p, g in zip(net.parameters(), grads):
            p.grad = g
        norms.append(float(clipper.step(opt).norm))  # type: ignore[union-attr]
        opt.step()
    assert len(r0["norms"]) == 6 and len(r1["norms"]) == 3
    _close(r0["norms"], norms, 1e-5, what="rank 0: norms")
    _close(r1["norms"], norms[:3], 1e-5, what="rank 1: norms")
    _params_close(r0["params"], [p.detach() for p in net.parameters()], "rank 0: final parameters")


# ---------------------------------------------------------------------------------------- FSDP2
def test_fsdp2_model_parallel_norm_is_global_and_clips_whole_gradient(jobs: dict[str, _Job]) -> None:
    outs = jobs["fsdp2"].outputs()
    _check_lightning_run(outs, sharded=True)
    for out in outs:  # exactly one all-reduce per optimizer step, with two param groups
        assert out["all_reduces"] == [1] * len(out["cb_norm"])


def test_fsdp2_auto_estimates_from_global_norms_and_matches_a_single_process_run(jobs: dict[str, _Job]) -> None:
    outs = jobs["fsdp2_auto"].outputs()
    _check_auto_run(outs)
    for out in outs:
        assert out["dtensor_grads"] == [True] * C.STEPS
        # one all-reduce for the gradient norm plus one more per step: the parameter norm for the first
        # step's bound, then the secant's two difference norms (reduced together)
        assert out["all_reduces"] == [2] * C.STEPS


# ---------------------------------------------------------------------------------------- FSDP1
@pytest.fixture(scope="module")
def fsdp1_reference() -> dict[str, Any]:
    """One step on the whole global batch: norms, clipped gradients, parameters after SGD."""
    x, y = C.make_data()
    net = C.make_net()
    idx = list(range(C.GLOBAL_BATCH))
    C.loss_fn(net, x[idx], y[idx]).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    norms = {p: float(torch.linalg.vector_norm(flat, p)) for p in (2.0, 1.0, math.inf)}
    torch.nn.utils.clip_grad_norm_(net.parameters(), C.MAX_NORM)
    grads = [p.grad.clone() for p in net.parameters()]
    torch.optim.SGD(net.parameters(), lr=C.LR).step()
    assert norms[2.0] > 4 * C.MAX_NORM
    return {"norms": norms, "grads": grads, "params": [p.detach().clone() for p in net.parameters()]}


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_functional_grad_norm_and_clip(
    jobs: dict[str, _Job], fsdp1_reference: dict[str, Any], use_orig_params: bool
) -> None:
    ref = fsdp1_reference
    for r, out in enumerate(jobs["fsdp1"].outputs()):
        res = out[f"functional_uop{use_orig_params}"]
        where = f"rank {r}, use_orig_params={use_orig_params}"
        for p, want in ref["norms"].items():
            _close(res["norms"][p], want, 1e-5, what=f"{where}: grad_norm(norm_type={p}, process_group=...)")
        _close(res["clip_returned"], ref["norms"][2.0], 1e-5, what=f"{where}: clip_gradients_ returned norm")
        # The local shards alone give another number, and so does the library without the group.
        assert res["naive"] < 0.95 * ref["norms"][2.0], (where, res["naive"])
        _close(res["naive_lib"], res["naive"], 1e-5, what=f"{where}: grad_norm without a process group")
        if use_orig_params:
            _params_close(res["grads"], ref["grads"], f"{where}: clipped gradients (gathered)")
        _params_close(res["params"], ref["params"], f"{where}: parameters after clip + SGD")


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_gradient_clipper_step_with_shard_predicate(
    jobs: dict[str, _Job], fsdp1_reference: dict[str, Any], use_orig_params: bool
) -> None:
    ref = fsdp1_reference
    for r, out in enumerate(jobs["fsdp1"].outputs()):
        res = out[f"clipper_uop{use_orig_params}"]
        where = f"rank {r}, use_orig_params={use_orig_params}"
        _close(res["norm"], ref["norms"][2.0], 1e-5, what=f"{where}: GradientClipper.step norm")
        _params_close(res["params"], ref["params"], f"{where}: parameters after clip + SGD")


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_callback_hook_finds_group_and_clips(
    jobs: dict[str, _Job], fsdp1_reference: dict[str, Any], use_orig_params: bool
) -> None:
    ref = fsdp1_reference
    for r, out in enumerate(jobs["fsdp1"].outputs()):
        res = out[f"callback_uop{use_orig_params}"]
        where = f"rank {r}, use_orig_params={use_orig_params}"
        assert res["found"] == "fsdp_group", f"{where}: _find_fsdp1_group gave {res['found']}"
        assert res["found_plain"] is None, f"{where}: a plain module is not FSDP1"
        _close(res["norm"], ref["norms"][2.0], 1e-5, what=f"{where}: L0L1Clipping l0l1/grad_norm")
        _params_close(res["params"], ref["params"], f"{where}: parameters after the hook + SGD")


def test_fsdp1_no_shard_gradients_are_not_summed_over_ranks(
    jobs: dict[str, _Job], fsdp1_reference: dict[str, Any]
) -> None:
    """``NO_SHARD`` FSDP units hold whole gradients: summing them over the group would give sqrt(2) x the norm."""
    ref = fsdp1_reference
    for r, out in enumerate(jobs["fsdp1"].outputs()):
        res = out["callback_noshard"]
        assert res["found"] == "none", f"rank {r}: _find_fsdp1_group gave {res['found']} for NO_SHARD"
        _close(res["norm"], ref["norms"][2.0], 1e-5, what=f"rank {r}: NO_SHARD l0l1/grad_norm")
        _params_close(res["params"], ref["params"], f"rank {r}: NO_SHARD parameters after the hook + SGD")


@pytest.mark.parametrize("which", ["clipper", "functional"])
def test_fsdp1_rank_without_local_gradients_still_joins_the_all_reduce(jobs: dict[str, _Job], which: str) -> None:
    """Clipping only the head, whose shard lies wholly on rank 1: rank 0 holds no gradient at all.

    A rank that returned early would skip the all-reduce the other rank is waiting in.
    """
    x, y = C.make_data()
    net = C.make_net()
    idx = list(range(C.GLOBAL_BATCH))
    C.loss_fn(net, x[idx], y[idx]).backward()
    head = list(net[2].parameters())
    want = float(torch.nn.utils.clip_grad_norm_(head, C.MAX_NORM))
    torch.optim.SGD(head, lr=C.LR).step()
    ref_params = [p.detach().clone() for p in net.parameters()]
    assert want > 4 * C.MAX_NORM

    outs = jobs["fsdp1"].outputs()
    results = [o.get(f"head_{which}", {"error": "not reached: an earlier case broke the process group"}) for o in outs]
    errors = [r.get("error") for r in results]
    assert not any(errors), f"{which}: {errors}"
    assert not any(results[0]["local_grads"]) and all(results[1]["local_grads"]), (
        f"precondition: the head's gradients should be wholly on rank 1, got {[r['local_grads'] for r in results]}"
    )
    for r, res in enumerate(results):
        assert res["norm"] is not None, f"rank {r}: {which} did nothing"
        _close(res["norm"], want, 1e-5, what=f"rank {r}: {which} norm of the head's gradients")
        _params_close(res["params"], ref_params, f"rank {r}: parameters after clipping the head + SGD")
