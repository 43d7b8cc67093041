"""``auto``'s divergence watch (``lightning_l0l1.watch``): it warns once where the training loss rises while
``auto`` keeps its step, and not on runs that converge, fluctuate or rise briefly.

The references: a plain-Python re-implementation of the criterion over the per-step losses and effective
learning rates recorded on the host (:func:`reference_warning_step`), the loss curves themselves (a run
that warns must have risen, one that does not must have converged), and a plain loop for the callback.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import warnings
from typing import Any, Optional

import pytest
import torch
from _sync import HostReads

import lightning_l0l1.modes as modes
from lightning_l0l1 import GradientClipper
from lightning_l0l1.watch import DEFAULT_WINDOW, Criterion, DivergenceWarning, Window

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- references


def reference_windows(losses: list[float], lrs: list[float], window: int) -> list[tuple[int, int, float, float]]:
    """``(first, last, mean loss, mean lr)`` of each complete window, steps counted from 1 (plain Python)."""
    out = []
    for k in range(len(losses) // window):
        chunk = losses[k * window:(k + 1) * window]
        finite = [v for v in chunk if math.isfinite(v)]
        mean = math.fsum(finite) / len(finite) if finite else math.inf
        out.append((k * window + 1, (k + 1) * window, mean, math.fsum(lrs[k * window:(k + 1) * window]) / window))
    return out


def reference_warning_step(losses: list[float], lrs: list[float], window: int = DEFAULT_WINDOW) -> Optional[int]:
    """The step at whose end the warning is due: 3 windows in a row whose mean loss exceeds twice the lowest
    window mean so far (and that mean plus 1e-3 of the first window's), at an effective lr at least half the
    lowest window's; a window is judged when the window after it closes."""
    wins = reference_windows(losses, lrs, window)
    if not wins:
        return None
    first, best, run = wins[0][2], wins[0], 0
    for i, w in enumerate(wins[1:], start=1):
        if w[2] < best[2]:
            best, run = w, 0
            continue
        risen = w[2] > 2 * best[2] and w[2] - best[2] > 1e-3 * first and w[3] >= 0.5 * best[3]
        run = run + 1 if risen else 0
        if run == 3:
            due = (i + 2) * window  # read when the next window closes
            return due if due <= len(losses) else None
    return None


def _divergence(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DivergenceWarning)]


def run_loop(
    params: list[torch.Tensor], opt: torch.optim.Optimizer, loss_fn: Any, steps: int, clipper: GradientClipper,
    feed: Any = None,
) -> tuple[list[float], list[float], list[tuple[int, str]]]:
    """A plain loop; the losses, effective lrs and the divergence warnings with the step they came at."""
    losses, lrs, warned = [], [], []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(1, steps + 1):
            opt.zero_grad()
            loss = loss_fn(t)
            loss.backward()
            fed = loss if feed is None else feed(t, loss)
            out = clipper.step(opt, loss=fed)
            opt.step()
            losses.append(float(fed.detach()))
            lrs.append(float(out.record.lr_effective[0]))
            for text in _divergence(rec):
                warned.append((t, text))
            rec.clear()
    return losses, lrs, warned


def quadratic_run(steps: int = 4000, nesterov: bool = False, **kw: Any):
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5, momentum=0.9, nesterov=nesterov)
    h = torch.tensor([10.0, 1.0])
    return run_loop([w], opt, lambda t: 0.5 * (h * w * w).sum(), steps, GradientClipper(**kw))


def mlp_run(seed: int, kind: str, lr: float, steps: int, batch: Optional[int] = None, **kw: Any):
    """The MLP of tests/test_auto_stability.py (full batch of 64), or minibatches of ``batch`` from 512 noisy rows."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    n = 512 if batch else 64
    x = torch.randn(n, 4)
    y = torch.sin(x.sum(1, keepdim=True)) + (0.1 * torch.randn(n, 1) if batch else 0.0)
    params = list(net.parameters())
    opt = {
        "adam": lambda: torch.optim.Adam(params, lr=lr),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
    }[kind]()
    g = torch.Generator().manual_seed(seed)

    def loss_fn(t: int) -> torch.Tensor:
        idx = torch.randint(0, n, (batch,), generator=g) if batch else slice(None)
        return torch.nn.functional.mse_loss(net(x[idx]), y[idx])

    return run_loop(params, opt, loss_fn, steps, GradientClipper(**kw))


def _numbers_in(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def _assert_names_the_windows(text: str, losses: list[float], lrs: list[float], due: int) -> None:
    """The message gives the lowest window's and the last three windows' mean losses (and step ranges) and lrs,
    as the reference computes them from the recorded steps."""
    wins = [w for w in reference_windows(losses, lrs, DEFAULT_WINDOW) if w[1] <= due - DEFAULT_WINDOW]
    best = min(wins, key=lambda w: w[2])
    numbers = _numbers_in(text)
    for first, last, loss, lr in [best, *wins[-3:]]:
        assert f"steps {first}-{last}" in text, (first, last, text)
        assert any(v == pytest.approx(loss, rel=5e-3) for v in numbers), (loss, text)
        assert any(v == pytest.approx(lr, rel=5e-3) for v in numbers), (lr, text)
    for hint in ("`lr`", "`mode='clip'`", "`max_norm`", "`divergence_window=None`"):
        assert hint in text


# ---------------------------------------------------------------------------- the plain loop


def test_the_quadratic_without_the_rise_bound_warns_once_naming_the_losses(monkeypatch):
    """SGD momentum 0.9 at lr 0.5 on curvatures 10 and 1 (float32): without the rise bound (``RISE = inf``, the
    earlier behaviour) the loss converges and then diverges: one warning, at the step the reference predicts,
    before the loss has blown up."""
    monkeypatch.setattr(modes, "RISE", math.inf)
    losses, lrs, warned = quadratic_run()
    assert max(losses[2500:]) > 1e3 > 1e-4 > min(losses[:1500])  # it did converge, then diverge
    due = reference_warning_step(losses, lrs)
    assert due is not None
    assert [t for t, _ in warned] == [due]
    assert due < next(i + 1 for i, v in enumerate(losses) if i > 1000 and v > 1.0)  # before it is back at 1
    text = warned[0][1]
    assert text.startswith("`GradientClipper`: the training loss rose while `mode='auto'` kept its step")
    _assert_names_the_windows(text, losses, lrs, due)


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_quadratic_with_the_rise_bound_converges_without_a_warning(nesterov):
    losses, lrs, warned = quadratic_run(nesterov=nesterov)
    assert max(losses[1000:]) < 1e-4  # converged, and the float32 loss runs down to about 0
    assert losses[-1] < 1e-20
    assert reference_warning_step(losses, lrs) is None
    assert warned == []


@pytest.mark.parametrize("seed", [0, 1])
def test_adam_at_lr_1_spikes_and_warns(seed):
    """The documented case outside what ``auto`` guarantees: Adam at lr 1 on the MLP converges, then spikes."""
    losses, lrs, warned = mlp_run(seed, "adam", 1.0, 700)
    low = min(losses)
    assert max(losses[losses.index(low):]) > 100 * low  # the spike
    due = reference_warning_step(losses, lrs)
    assert due is not None and [t for t, _ in warned] == [due]
    _assert_names_the_windows(warned[0][1], losses, lrs, due)


@pytest.mark.parametrize(("kind", "lr"), [("sgd", 0.1), ("momentum", 0.05), ("adamw", 3e-3), ("adam", 1e-2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_minibatch_runs_do_not_warn(kind, lr, seed):
    """Minibatches of 16 from 512 noisy rows, 600 steps: per-step losses that fluctuate by several times
    (checked), a run that learns (checked), and no warning."""
    losses, lrs, warned = mlp_run(seed, kind, lr, 600, batch=16)
    late = losses[300:]
    assert max(late) > 3 * min(late)  # noisy
    assert math.fsum(losses[-100:]) < 0.5 * math.fsum(losses[:100])  # learning
    assert reference_warning_step(losses, lrs) is None
    assert warned == []


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_float32_loss_converging_to_0_does_not_warn(kind):
    """Noise around a converged near-zero loss (relative jumps of many times, at 1e-30 and below) never
    exceeds the margin of 1e-3 of the first window's mean."""
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0, 1.0, 0.5]))
    h = torch.tensor([10.0, 1.0, 0.1, 3.0])
    opt = {"sgd": lambda: torch.optim.SGD([w], lr=0.1), "momentum": lambda: torch.optim.SGD([w], lr=0.1, momentum=0.9),
           "adam": lambda: torch.optim.Adam([w], lr=1e-2)}[kind]()
    losses, lrs, warned = run_loop([w], opt, lambda t: 0.5 * (h * w * w).sum(), 1500, GradientClipper())
    assert losses[-1] < 1e-3 * losses[0]
    assert reference_warning_step(losses, lrs) is None
    assert warned == []


def _bump(windows: int):
    """The fed loss: the true loss, times 4 over ``windows`` windows starting at step 101."""
    def feed(t: int, loss: torch.Tensor) -> torch.Tensor:
        inside = 100 < t <= 100 + windows * DEFAULT_WINDOW
        return loss * 4.0 if inside else loss
    return feed


@pytest.mark.parametrize(("windows", "warns"), [(2, False), (4, True)])
def test_a_brief_rise_does_not_warn_a_lasting_one_does(windows, warns):
    """A bump of the loss early in the run (a warmup), of 2 windows, is forgiven; the same bump over 4 windows
    warns (the test can fail both ways). The loss of a slowly converging quadratic, SGD lr 0.01."""
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    h = torch.tensor([0.1, 0.05])
    opt = torch.optim.SGD([w], lr=0.01)
    losses, lrs, warned = run_loop([w], opt, lambda t: 0.5 * (h * w * w).sum(), 600, GradientClipper(),
                                   feed=_bump(windows))
    due = reference_warning_step(losses, lrs)
    assert (due is not None) is warns
    assert [t for t, _ in warned] == ([due] if warns else [])


def test_no_warning_where_auto_backs_off():
    """A rise while the effective learning rate falls below half of the lowest window's: ``auto`` reacted."""
    c = Criterion()
    best = Window(1, 50, 1.0, 0.1, 5.0, 1.0)
    assert not c.judge(Window(1, 50, 10.0, 0.1, 5.0, 1.0))
    assert not c.judge(best)
    for k in range(5):
        assert not c.judge(Window(101 + 50 * k, 150 + 50 * k, 5.0, 0.04, 5.0, 1.0))
    assert c.judge(Window(400, 450, 5.0, 0.06, 5.0, 1.0)) is False
    assert not c.judge(Window(450, 500, 5.0, 0.06, 5.0, 1.0))
    assert c.judge(Window(500, 550, 5.0, 0.06, 5.0, 1.0))


@pytest.mark.parametrize(
    ("means", "warns"),
    [
        ([1.0, 0.1, 0.25, 0.25, 0.25], True),  # 2.5 times the lowest, 3 windows
        ([1.0, 0.1, 0.19, 0.19, 0.19], False),  # under twice the lowest
        ([1.0, 0.1, 0.25, 0.25, 0.15, 0.25], False),  # the run is broken
        ([1.0, 1e-9, 1e-6, 1e-6, 1e-6], False),  # 1000 times, but under the margin (1e-3 of 1.0)
        ([-1.0, -2.0, -0.5, -0.5, -0.5], False),  # a negative loss: risen by less than its magnitude
        ([-1.0, -2.0, 0.5, 0.5, 0.5], True),  # by more
        ([1.0, 0.1, math.inf, math.inf, math.inf], True),  # windows without a finite loss
    ],
)
def test_the_criterion_on_made_up_windows(means, warns):
    c = Criterion()
    verdicts = [c.judge(Window(50 * k + 1, 50 * (k + 1), m, 0.1, math.nan, 1.0)) for k, m in enumerate(means)]
    assert verdicts[-1] is warns and not any(verdicts[:-1])


# ---------------------------------------------------------------------------- settings


def test_the_watch_imports_only_torch():
    import subprocess
    import sys

    names = ("pytorch_lightning", "lightning", "lightning.pytorch", "wandb")
    code = f"import sys, lightning_l0l1.watch\nprint([m for m in {names!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "50"])
def test_divergence_window_is_validated(bad):
    expected = f"`divergence_window` must be None or an integer >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        GradientClipper(divergence_window=bad)


def test_none_turns_the_watch_off_and_other_modes_ignore_the_loss(monkeypatch):
    monkeypatch.setattr(modes, "RISE", math.inf)
    assert quadratic_run(divergence_window=None)[2] == []
    clip = GradientClipper("clip", max_norm=1e9)
    assert clip._watch is None and GradientClipper()._watch is not None
    assert quadratic_run(mode="clip", max_norm=1e9, steps=300)[2] == []


def test_a_smaller_window_warns_sooner(monkeypatch):
    monkeypatch.setattr(modes, "RISE", math.inf)
    losses, lrs, warned = quadratic_run(divergence_window=20)
    due = reference_warning_step(losses, lrs, window=20)
    assert due is not None and [t for t, _ in warned] == [due]


@pytest.mark.parametrize("bad", [torch.ones(3), "0.5", None.__class__])
def test_a_loss_that_is_not_one_number_is_refused(bad):
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    w.sum().backward()
    with pytest.raises(ValueError, match="`loss` must be"):
        GradientClipper().step(opt, loss=bad)


def test_the_watch_changes_no_number_and_no_checkpoint():
    """Feeding the loss leaves parameters, ``latest()`` and ``state_dict()`` as without it; a pickled or reloaded
    clipper starts its watch afresh."""
    results = []
    for feed in (False, True):
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        clipper = GradientClipper(divergence_window=5)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        for _ in range(40):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            clipper.step(opt, loss=loss if feed else None)
            opt.step()
        results.append(([p.detach().clone() for p in net.parameters()], clipper.latest(), clipper.state_dict()))
    (p0, l0, s0), (p1, l1, s1) = results
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)) and l0 == l1
    assert repr(s0) == repr(s1)
    assert clipper._watches[0].criterion.first is not None
    assert pickle.loads(pickle.dumps(clipper))._watches == {} and copy.deepcopy(clipper)._watches == {}
    clipper.load_state_dict(s1)
    assert clipper._watches == {}


# ---------------------------------------------------------------------------- host reads


def test_one_host_read_per_window_a_window_late():
    """With ``nonfinite='propagate'`` the clipper itself reads nothing: the watch reads one transfer at the end
    of each window from the second on (the window before it), none at any other step, none without a loss."""
    window, steps = 10, 95
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for feed in (True, False):
        clipper = GradientClipper(nonfinite="propagate", divergence_window=window)
        per_step = []
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            with HostReads() as reads:
                clipper.step(opt, loss=loss if feed else None)
            per_step.append((reads.scalar, reads.transfers, reads.kernel_syncs))
            opt.step()
        reading = [t + 1 for t, r in enumerate(per_step) if r != (0, 0, 0)]
        if feed:
            assert reading == list(range(2 * window, steps + 1, window))  # steps 20, 30, ..., 90
            assert all(per_step[t - 1] == (0, 1, 0) for t in reading)
        else:
            assert reading == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_window_is_read_from_pinned_memory_without_a_sync_per_step():
    window = 5
    net = torch.nn.Linear(4, 1).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4, device="cuda"), torch.randn(16, 1, device="cuda")
    clipper = GradientClipper(nonfinite="propagate", divergence_window=window)
    reads = HostReads()
    for _ in range(4 * window):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        with reads:
            clipper.step(opt, loss=loss)
        opt.step()
    assert (reads.scalar, reads.transfers, reads.kernel_syncs) == (0, 3, 0)
    assert clipper._watches[0].queued[0]._host.is_pinned()


# ---------------------------------------------------------------------------- through the callback

LIGHTNING_STEPS = 420


def _namespace(name: str) -> tuple[Any, Any]:
    """(Lightning's ``pytorch`` package, the callback class) of ``pytorch_lightning`` or ``lightning.pytorch``."""
    if name == "pl":
        import pytorch_lightning as pl

        from lightning_l0l1.pytorch_lightning import L0L1Clipping
    else:
        pl = pytest.importorskip("lightning.pytorch")
        from lightning_l0l1.lightning import L0L1Clipping  # type: ignore[assignment]
    return pl, L0L1Clipping


def _mlp_data(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 4)
    return net, x, torch.sin(x.sum(1, keepdim=True))


class _Batches(torch.utils.data.Dataset):
    """``n`` batches: the whole data each time, or its halves in turn (two micro-batches per step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int, halves: bool) -> None:
        self.x, self.y, self.n, self.halves = x, y, n, halves

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.halves:
            return self.x, self.y
        part = slice(0, 32) if i % 2 == 0 else slice(32, 64)
        return self.x[part], self.y[part]


def plain_adam_reference(seed: int, steps: int, accumulate: int = 1) -> list[tuple[int, str]]:
    """The plain loop of the Lightning runs below: Adam lr 1, the loss of each micro-batch divided by
    ``accumulate`` before backward (as Lightning does), their sum fed as the step's loss."""
    net, x, y = _mlp_data(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1.0)
    clipper = GradientClipper()
    warned = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(1, steps + 1):
            opt.zero_grad()
            total = None
            for j in range(accumulate):
                part = slice(None) if accumulate == 1 else (slice(0, 32) if j == 0 else slice(32, 64))
                loss = torch.nn.functional.mse_loss(net(x[part]), y[part]) / accumulate
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            clipper.step(opt, loss=total)
            opt.step()
            warned += [(t, text) for text in _divergence(rec)]
            rec.clear()
    return warned


def lightning_adam_run(namespace: str, seed: int, steps: int, manual: bool = False, accumulate: int = 1):
    pl, L0L1Clipping = _namespace(namespace)
    net, x, y = _mlp_data(seed)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.automatic_optimization = not manual

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            loss = torch.nn.functional.mse_loss(self.net(xb), yb)
            if not manual:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.net.parameters(), lr=1.0)

    cb = L0L1Clipping()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
                         accumulate_grad_batches=accumulate, callbacks=[cb])
    data = torch.utils.data.DataLoader(_Batches(x, y, steps * accumulate, accumulate > 1), batch_size=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.fit(Module(), data)
    warned = _divergence(rec)
    return warned, trainer.global_step


@pytest.mark.parametrize(("namespace", "manual", "accumulate"),
                         [("pl", False, 1), ("lightning", False, 1), ("pl", True, 1), ("pl", False, 2)])
def test_the_callback_warns_once_as_the_plain_loop_does(namespace, manual, accumulate):
    """Adam at lr 1 on the MLP through a Trainer (automatic optimization in both namespaces, manual
    optimization, ``accumulate_grad_batches=2``): the callback takes the losses from ``on_before_backward``
    and gives the plain loop's warning, the same text, once."""
    seed = 4 if accumulate > 1 else 5  # seeds whose plain run warns early (at steps 350 and 300)
    want = plain_adam_reference(seed, LIGHTNING_STEPS, accumulate)
    assert len(want) == 1  # the reference run itself warns (once)
    warned, steps = lightning_adam_run(namespace, seed, LIGHTNING_STEPS, manual, accumulate)
    assert steps == LIGHTNING_STEPS
    assert len(warned) == 1
    assert warned[0] == want[0][1].replace("`GradientClipper`", "`L0L1Clipping`", 1)


@pytest.mark.parametrize("case", ["fp16", "accumulate3", "two_optimizers"])
def test_the_callback_feeds_each_optimizer_the_mean_loss_of_its_step(case):
    """What reaches ``GradientClipper.step(loss=...)`` against the losses ``training_step`` computed: unscaled
    under an fp16 GradScaler (scale 2**10), the mean of the micro-batches with ``accumulate_grad_batches=3``
    (the last accumulation of the epoch shorter: 7 batches), and with two optimizers in manual optimization,
    each optimizer the loss backpropagated since the optimizer before it stepped."""
    pl, L0L1Clipping = _namespace("pl")
    from pytorch_lightning.plugins import MixedPrecision

    net, x, y = _mlp_data(0)
    head = torch.nn.Linear(1, 1)
    computed: list[tuple[int, float]] = []  # (optimizer, loss)
    two = case == "two_optimizers"

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.head = net, head
            self.automatic_optimization = not two

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            loss = torch.nn.functional.mse_loss(self.net(xb), yb)
            if not two:
                computed.append((0, float(loss.detach())))
                return loss
            opt_a, opt_b = self.optimizers()
            for k, (opt, out) in enumerate([(opt_a, self.net(xb)), (opt_b, self.head(self.net(xb).detach()))]):
                part = torch.nn.functional.mse_loss(out, yb) * (k + 1)
                computed.append((k, float(part.detach())))
                opt.zero_grad()
                self.manual_backward(part)
                opt.step()
            return None

        def configure_optimizers(self) -> Any:
            if two:
                return [torch.optim.SGD(self.net.parameters(), lr=0.01),
                        torch.optim.SGD(self.head.parameters(), lr=0.01)]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb = L0L1Clipping()
    fed: list[tuple[int, float]] = []
    inner = cb.clipper.step

    def spy(optimizer: Any, key: int = 0, **kw: Any) -> Any:
        fed.append((key, float(kw["loss"])))
        return inner(optimizer, key, **kw)

    cb.clipper.step = spy  # type: ignore[method-assign]
    kw: dict[str, Any] = {}
    if case == "fp16":
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
    if case == "accumulate3":
        kw["accumulate_grad_batches"] = 3
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=1, callbacks=[cb], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), torch.utils.data.DataLoader(_Batches(x, y, 7, True), batch_size=None))
    if case == "accumulate3":
        losses = [v for _, v in computed]
        want = [(0, math.fsum(losses[i:i + 3]) / len(losses[i:i + 3])) for i in range(0, 7, 3)]
    else:
        want = computed
    assert [k for k, _ in fed] == [k for k, _ in want]
    assert [v for _, v in fed] == pytest.approx([v for _, v in want], rel=1e-6)
