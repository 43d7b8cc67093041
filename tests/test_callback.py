"""The Lightning callback on one CPU process, against plain-PyTorch references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _models import Recorder, Regressor, TwoOptimizers, loader, make_data, make_net, params_of, reference_loop, trainer
from _reference import ref_norm
from _sync import HookReads, HostReads
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_l0l1 import L0L1Clipping, NonFiniteGradientError

# ---------------------------------------------------------------------------- references


def torch_clip(max_norm: float, norm_type: float = 2.0):
    def fn(opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    return fn


def closed_form(kind: str, max_norm: float = 1.0, l0: float = 0.0, l1: float = 0.0):
    """Independent closed forms in float64 over all grads of the optimizer."""

    def fn(opt: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        n = ref_norm(grads, 2.0)
        for group in opt.param_groups:
            if kind == "adaptive":
                s = max_norm / (n + max_norm)
            else:
                s = min(1.0, 1.0 / (group["lr"] * (l0 + l1 * n)))
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(s)

    return fn


def assert_params_close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(params_of(a) if not isinstance(a, list) else a, params_of(b) if not isinstance(b, list) else b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- the three rules end to end


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_trains_like_torch_clip_grad_norm(norm_type):
    ds, net = make_data(), make_net()
    cb = L0L1Clipping(mode="clip", max_norm=0.5, norm_type=norm_type)
    model = Regressor(make_net())
    trainer(callbacks=[cb]).fit(model, loader(ds))
    ref = reference_loop(net, ds, torch_clip(0.5, norm_type))
    assert_params_close(model.net, ref)
    stats = cb.latest()
    assert stats["l0l1/steps"] == 12 and stats["l0l1/clip_rate"] > 0.5  # clipping was active


def test_adaptive_and_l0l1_match_closed_forms():
    ds = make_data()
    for kw, ref_fn in [
        (dict(mode="adaptive", max_norm=2.0), closed_form("adaptive", max_norm=2.0)),
        (dict(mode="l0l1", l0=2.0, l1=0.5), closed_form("l0l1", l0=2.0, l1=0.5)),
    ]:
        cb = L0L1Clipping(**kw)
        model = Regressor(make_net(), two_groups=True)
        trainer(callbacks=[cb]).fit(model, loader(ds))
        ref = reference_loop(make_net(), ds, ref_fn, two_groups=True)
        assert_params_close(model.net, ref, rtol=1e-5, atol=1e-5)


def test_adaptive_post_norm_below_gamma_and_l0l1_effective_lr():
    ds = make_data()
    cb = L0L1Clipping(mode="l0l1", l0=1.0, l1=0.3)
    after = Recorder(cb)
    model = Regressor(make_net(), lr=0.05, two_groups=True)
    trainer(callbacks=[cb, after], max_epochs=1).fit(model, loader(ds))
    for st in after.latest:
        n = st["l0l1/grad_norm"]
        # eta_eff = min(eta, 1/(L0 + L1 n)) for each group: 0.05 and 0.15
        assert st["l0l1/lr_effective"] == pytest.approx(min(0.05, 1 / (1.0 + 0.3 * n)), rel=1e-5)
        assert st["l0l1/lr_effective_pg1"] == pytest.approx(min(0.15, 1 / (1.0 + 0.3 * n)), rel=1e-5)
        assert st["l0l1/max_norm"] == pytest.approx((1 / 0.05 - 1.0) / 0.3, rel=1e-6)
        assert 0 < st["l0l1/scale"] <= 1

    cb = L0L1Clipping(mode="adaptive", max_norm=0.7)
    after = Recorder(cb)
    trainer(callbacks=[cb, after], max_epochs=1).fit(Regressor(make_net()), loader(ds))
    for st, post in zip(after.latest, after.norms):
        assert post < 0.7
        assert st["l0l1/grad_norm_scaled"] == pytest.approx(post, rel=1e-5)
        assert st["l0l1/scale"] == pytest.approx(0.7 / (st["l0l1/grad_norm"] + 0.7), rel=1e-6)


def test_accumulate_grad_batches_clips_once_per_optimizer_step():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.3)
    model = Regressor(make_net())
    trainer(callbacks=[cb], accumulate_grad_batches=2).fit(model, loader(ds))
    ref = reference_loop(make_net(), ds, torch_clip(0.3), accumulate=2)
    assert_params_close(model.net, ref)
    assert cb.latest()["l0l1/steps"] == 6  # 6 batches/epoch, 2 per step, 2 epochs


def test_frozen_parameters_and_mixed_dtypes():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.4)
    model = Regressor(make_net(frozen=True, dtype=torch.float64))
    trainer(callbacks=[cb]).fit(model, loader(ds))
    ref = reference_loop(make_net(frozen=True, dtype=torch.float64), ds, torch_clip(0.4))
    assert_params_close(model.net, ref)
    assert model.net[4].weight.dtype == torch.float64


def test_training_step_returning_none_is_a_no_op():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.1)
    model = Regressor(make_net(), return_none=True)
    before = params_of(model)
    trainer(callbacks=[cb], max_epochs=1).fit(model, loader(ds))
    assert_params_close(params_of(model), before, rtol=0, atol=0)
    assert cb.latest() == {}


def test_bf16_mixed_norm_is_float32_and_matches_autocast_reference():
    ds = make_data()
    probe = Recorder()
    cb = L0L1Clipping(mode="clip", max_norm=0.5)
    after = Recorder(cb)
    model = Regressor(make_net())
    trainer(callbacks=[probe, cb, after], precision="bf16-mixed", max_epochs=1).fit(model, loader(ds))
    assert [st["l0l1/grad_norm"] for st in after.latest] == pytest.approx(probe.norms, rel=1e-6)

    def ref_scale(opt):
        torch_clip(0.5)(opt)

    # Reference: the same steps under CPU bf16 autocast in a plain loop.
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader(ds):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(net(x).float(), y)
        loss.backward()
        ref_scale(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_params_close(model.net, net, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------- fp16 GradScaler and fused optimizers


def fp16_plugin(init_scale: float = 2.0**8) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_gradscaler_norms_are_unscaled(fused):
    ds = make_data(scale=0.1)
    probe = Recorder()
    cb = L0L1Clipping(mode="clip", max_norm=0.5)
    after = Recorder(cb)
    model = Regressor(make_net(), optimizer="adam", lr=1e-3, fused=fused)
    trainer(callbacks=[probe, cb, after], plugins=[fp16_plugin()], max_epochs=1).fit(model, loader(ds))
    got = [st["l0l1/grad_norm"] for st in after.latest]
    assert all(math.isfinite(v) for v in got) and len(got) == 6
    if fused:
        # Lightning leaves fused optimizers' grads scaled: the probe before the callback sees
        # scale x the true norm; the callback unscaled them itself before measuring.
        expected = [n / s for n, s in zip(probe.norms, probe.scales)]
        assert min(probe.norms) > 10 * max(got)
    else:
        expected = probe.norms
    assert got == pytest.approx(expected, rel=1e-4)
    # And the clipped gradients are what the optimizer steps with: post norm <= max_norm
    assert max(after.norms) <= 0.5 * (1 + 1e-4)


def test_fused_and_unfused_adam_train_alike_under_fp16():
    ds = make_data(scale=0.1)
    nets = []
    for fused in (False, True):
        cb = L0L1Clipping(mode="clip", max_norm=0.2)
        model = Regressor(make_net(), optimizer="adam", lr=1e-3, fused=fused)
        trainer(callbacks=[cb], plugins=[fp16_plugin()], max_epochs=1).fit(model, loader(ds))
        nets.append(model.net)
    assert_params_close(nets[0], nets[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "zero"])
def test_fp16_overflow_steps_are_left_to_the_scaler(nonfinite):
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite=nonfinite)
    after = Recorder(cb)
    probe = Recorder()
    model = Regressor(make_net(), optimizer="adam", lr=1e-3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        # A huge initial scale overflows fp16 at first: the scaler halves it and skips those steps.
        trainer(callbacks=[probe, cb, after], plugins=[fp16_plugin(2.0**40)], max_epochs=1).fit(model, loader(ds))
    overflow = sum(not math.isfinite(n) for n in probe.norms)
    assert overflow >= 1
    stats = cb.latest()
    assert stats["l0l1/nonfinite_steps"] == overflow
    assert all(math.isfinite(v) for st in after.latest for v in st.values())
    assert not any("not finite" in str(w.message) for w in rec)  # overflow is routine under a scaler


# ---------------------------------------------------------------------------- non-finite policies


def test_skip_leaves_params_and_momentum_untouched_and_warns_once():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite="skip")
    model = Regressor(make_net(), weight_decay=0.01, nan_at=(2, 7))
    with pytest.warns(UserWarning, match="not finite at step 2") as rec:
        trainer(callbacks=[cb]).fit(model, loader(ds))
    assert sum("not finite" in str(w.message) for w in rec) == 1
    ref = reference_loop(make_net(), ds, torch_clip(0.5), wd=0.01, skip_steps=(2, 7))
    assert_params_close(model.net, ref, rtol=0, atol=0)
    stats = cb.latest()
    assert stats["l0l1/nonfinite_steps"] == 2 and all(math.isfinite(v) for v in stats.values())


def test_zero_policy_steps_with_zero_gradients():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite="zero")
    model = Regressor(make_net(), weight_decay=0.01, nan_at=(3,))
    with pytest.warns(UserWarning, match="zeroed"):
        trainer(callbacks=[cb]).fit(model, loader(ds))
    ref = reference_loop(make_net(), ds, torch_clip(0.5), wd=0.01, zero_steps=(3,))
    assert_params_close(model.net, ref, rtol=0, atol=0)


def test_raise_policy_names_the_step():
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match="at step 4"):
        trainer(callbacks=[cb]).fit(Regressor(make_net(), nan_at=(4,)), loader(make_data()))


def test_propagate_lets_nan_through_but_not_into_state():
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite="propagate")
    after = Recorder(cb)
    model = Regressor(make_net(), nan_at=(1,))
    trainer(callbacks=[cb, after], max_epochs=1).fit(model, loader(make_data()))
    assert any(math.isnan(float(p.sum())) for p in model.parameters())  # like torch: NaN propagates
    assert after.latest[1]["l0l1/grad_norm"] == after.latest[0]["l0l1/grad_norm"]
    assert all(math.isfinite(v) for st in after.latest for v in st.values())
    assert cb.latest()["l0l1/nonfinite_steps"] >= 1


# ---------------------------------------------------------------------------- manual optimization


def test_manual_optimization_one_norm_and_state_per_optimizer():
    ds = make_data()
    cb = L0L1Clipping(mode="clip", max_norm=0.3)
    model = TwoOptimizers(make_net())
    trainer(callbacks=[cb], max_epochs=1).fit(model, loader(ds))

    net = make_net()
    opts = [
        torch.optim.SGD(net[0].parameters(), lr=0.05),
        torch.optim.SGD(list(net[2].parameters()) + list(net[4].parameters()), lr=0.02),
    ]
    last = []
    for x, y in loader(ds):
        torch.nn.functional.mse_loss(net(x), y).backward()
        last = []
        for opt in opts:
            params = [p for g in opt.param_groups for p in g["params"]]
            last.append(float(torch.nn.utils.clip_grad_norm_(params, 0.3)))
            opt.step()
        for opt in opts:
            opt.zero_grad()
    assert_params_close(model.net, net)
    stats = cb.latest()
    assert stats["l0l1/grad_norm_opt0"] == pytest.approx(last[0], rel=1e-5)
    assert stats["l0l1/grad_norm_opt1"] == pytest.approx(last[1], rel=1e-5)
    assert stats["l0l1/steps_opt0"] == stats["l0l1/steps_opt1"] == 6


# ---------------------------------------------------------------------------- environment checks and arguments


def test_warns_when_lightning_also_clips():
    with pytest.warns(UserWarning, match="clipped twice"):
        trainer(callbacks=[L0L1Clipping()], gradient_clip_val=1.0, max_steps=1).fit(
            Regressor(make_net()), loader(make_data())
        )


def test_deepspeed_is_refused_with_a_pointer_to_its_own_setting():
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DeepSpeedStrategy

    fake = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy), gradient_clip_val=None)
    with pytest.raises(RuntimeError, match="gradient_clipping"):
        L0L1Clipping().setup(fake, None, "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="clip", max_norm=-1.0), r"`max_norm`.*-1\.0"),
        (dict(mode="clip", max_norm=0), r"`max_norm`.*0"),
        (dict(mode="clip", max_norm=float("nan")), r"`max_norm`.*nan"),
        (dict(max_norm=1.0), r"`mode='auto'` \(the default\).*`max_norm` = 1\.0.*`mode='clip'`"),
        (dict(mode="clip", max_norm=None), r"`max_norm`.*None"),
        (dict(mode="l0l1", l0=1.0), r"`l0`.*`l1`.*None"),
        (dict(mode="l0l1", l0=-1.0, l1=1.0), r"`l0`.*-1\.0"),
        (dict(mode="l0l1", l0=1.0, l1=-2.0), r"`l1`.*-2\.0"),
        (dict(mode="l0l1", l0=0.0, l1=0.0), r"`l0` and `l1`"),
        (dict(mode="clipp"), r"`mode`.*'clipp'"),
        (dict(norm_type=0), r"`norm_type`.*0"),
        (dict(norm_type="two"), r"`norm_type`.*'two'"),
        (dict(nonfinite="ignore"), r"`nonfinite`.*'ignore'"),
        (dict(foreach="yes"), r"`foreach`.*'yes'"),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L0L1Clipping(**kwargs)


def test_defaults_and_state_key():
    cb = L0L1Clipping()
    assert (cb.mode, cb.max_norm, cb.nonfinite, cb.norm_type, cb.estimate) == ("auto", None, "skip", 2.0, True)
    assert L0L1Clipping(mode="clip", max_norm=1.0).estimate is False
    assert L0L1Clipping(mode="clip", max_norm=1.0).state_key != L0L1Clipping(mode="clip", max_norm=2.0).state_key
    assert L0L1Clipping(mode="clip", max_norm=1.0).state_key != cb.state_key
    assert L0L1Clipping(norm_type="inf").norm_type == math.inf


def test_repr_shows_the_settings_given():
    assert repr(L0L1Clipping()) == "L0L1Clipping(mode='auto')"
    cb = L0L1Clipping(mode="clip", max_norm=1.0, log_every_n_steps=10, layer_norms="module", nonfinite="skip")
    assert repr(cb) == "L0L1Clipping(mode='clip', max_norm=1.0, log_every_n_steps=10, layer_norms='module')"

    def my_loss(module, batch):
        return module(batch)

    shown = repr(L0L1Clipping(probe_loss=my_loss))
    assert shown.endswith("probe_loss=test_repr_shows_the_settings_given.<locals>.my_loss)")
    # what the repr shows builds the same callback
    again = eval(repr(cb), {"L0L1Clipping": L0L1Clipping})
    assert again.state_key == cb.state_key and repr(again) == repr(cb)


def test_a_misspelt_argument_names_the_class_users_create():
    with pytest.raises(TypeError, match=r"^L0L1Clipping\.__init__\(\) got an unexpected keyword argument 'max_nrom'$"):
        L0L1Clipping(mode="clip", max_nrom=1.0)  # type: ignore[call-arg]


def test_lightningcli_help_reads_as_text(capsys):
    """``--trainer.callbacks.help`` prints the arguments' docstrings: no reST roles or double backticks."""
    import inspect

    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.demos.boring_classes import BoringModel

    with pytest.raises(SystemExit):
        LightningCLI(BoringModel, args=["fit", "--trainer.callbacks.help", "lightning_l0l1.L0L1Clipping"])
    out = capsys.readouterr().out
    params = [p for p in inspect.signature(L0L1Clipping.__init__).parameters if p != "self"]
    for p in params:
        assert f"--trainer.callbacks.{p} " in out or f"--trainer.callbacks.{p}\n" in out, p
    for raw in (":math:", ":func:", ":class:", ":meth:", "``", "\\lVert", "\\eta"):
        assert raw not in out, raw
    assert "η_eff = min(η, 1/L_min, 2/(r·‖g‖))" in " ".join(out.split())


# ---------------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    ds = make_data()
    kw = dict(mode="clip", max_norm=0.4)
    # Uninterrupted: 4 epochs, with a NaN step so the counters are not trivial.
    cb_full, cb_other = L0L1Clipping(**kw), L0L1Clipping(mode="adaptive", max_norm=50.0)
    full = Regressor(make_net(), nan_at=(5,))
    trainer(callbacks=[cb_full, cb_other], max_epochs=4).fit(full, loader(ds))

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = Regressor(make_net(), nan_at=(5,))
    cb_a = L0L1Clipping(**kw)
    cbs = [cb_a, L0L1Clipping(mode="adaptive", max_norm=50.0), ckpt]
    trainer(callbacks=cbs, max_epochs=2, enable_checkpointing=True).fit(first, loader(ds))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert cb_a.state_key in saved and L0L1Clipping(mode="adaptive", max_norm=50.0).state_key in saved

    cb_b, cb_other_b = L0L1Clipping(**kw), L0L1Clipping(mode="adaptive", max_norm=50.0)
    resumed = Regressor(make_net(seed=123), nan_at=(5,))
    trainer(callbacks=[cb_b, cb_other_b], max_epochs=4).fit(resumed, loader(ds), ckpt_path=tmp_path / "last.ckpt")
    assert_params_close(resumed.net, full.net, rtol=0, atol=0)
    assert cb_b.latest() == cb_full.latest()
    assert cb_other_b.latest() == cb_other.latest()
    assert cb_b.latest()["l0l1/nonfinite_steps"] == 1


def test_checkpoint_of_auto_from_before_it_was_the_default_still_resumes(tmp_path):
    """Old `L0L1Clipping(mode="auto")` checkpoints carry `max_norm: 1.0` in their state key (and no ratio
    window in their estimator state): the callback finds them under that key and continues."""
    ds = make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb_a = L0L1Clipping()
    trainer(callbacks=[cb_a, ckpt], max_epochs=1, enable_checkpointing=True).fit(Regressor(make_net()), loader(ds))
    steps = cb_a.latest()["l0l1/steps"]
    assert steps > 2
    data = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = data["callbacks"].pop(cb_a.state_key)
    old_key = (
        "L0L1Clipping{'mode': 'auto', 'max_norm': 1.0, 'l0': None, 'l1': None, 'norm_type': 2.0, 'estimate': True}"
    )
    for opt_state in state["clipper"]["optimizers"].values():
        del opt_state["env"]["window"], opt_state["env"]["ratio"]
    data["callbacks"][old_key] = state
    torch.save(data, tmp_path / "old.ckpt")

    cb_b = L0L1Clipping()
    trainer(callbacks=[cb_b], max_epochs=2).fit(Regressor(make_net()), loader(ds), ckpt_path=tmp_path / "old.ckpt")
    assert cb_b.latest()["l0l1/steps"] == 2 * steps  # continued from the checkpoint, not from zero
    assert cb_b.latest()["l0l1/smoothness_pairs"] == 2 * steps - 1  # the estimator's count went on too


# ---------------------------------------------------------------------------- host syncs


def _syncs_in_hook(cb: L0L1Clipping, **model_kw) -> tuple[int, int]:
    """Count host reads inside the callback's hook only, over a whole fit."""
    hook = HookReads(cb, "on_before_optimizer_step")
    trainer(callbacks=[cb], max_epochs=3).fit(Regressor(make_net(), **model_kw), loader(make_data()))
    return hook.reads.n, hook.calls


@pytest.mark.parametrize("mode", ["clip", "adaptive", "l0l1"])
def test_no_host_sync_with_propagate(mode):
    cb = L0L1Clipping(mode=mode, max_norm=0.5, l0=1.0, l1=0.5, nonfinite="propagate")
    n, calls = _syncs_in_hook(cb, two_groups=True)
    assert calls == 18 and n == 0


@pytest.mark.parametrize("nonfinite", ["skip", "zero", "raise"])
def test_one_host_read_per_step_with_a_host_policy(nonfinite):
    cb = L0L1Clipping(mode="clip", max_norm=0.5, nonfinite=nonfinite)
    n, calls = _syncs_in_hook(cb)
    assert calls == 18 and n == calls


def test_counter_sees_host_reads():
    # The counter itself must be able to fail: latest() reads the device.
    cb = L0L1Clipping(mode="clip", max_norm=0.5)
    trainer(callbacks=[cb], max_steps=2).fit(Regressor(make_net()), loader(make_data()))
    with HostReads() as c:
        cb.latest()
    assert c.n > 0


# ---------------------------------------------------------------------------- fused optimizers without a scaler


def test_fused_handoff_trains_like_scaling_and_skips_in_kernel_without_a_host_read():
    ds = make_data()
    runs = {}
    for fused, handoff in [(False, False), (True, True), (True, False)]:
        cb = L0L1Clipping(mode="clip", max_norm=0.3, fused_handoff=handoff)
        model = Regressor(make_net(), optimizer="adam", lr=1e-2, fused=fused, nan_at=(3,))
        hook = HookReads(cb, "on_before_optimizer_step")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(callbacks=[cb]).fit(model, loader(ds))
        runs[(fused, handoff)] = (model, cb.latest(), hook.reads.n, hook.calls)
    ref_model, ref_stats, ref_syncs, calls = runs[(False, False)]
    for key in [(True, True), (True, False)]:
        model, stats, _, _ = runs[key]
        assert_params_close(model.net, ref_model.net, rtol=1e-5, atol=1e-6)
        assert stats["l0l1/nonfinite_steps"] == ref_stats["l0l1/nonfinite_steps"] == 1
        assert stats["l0l1/grad_norm"] == pytest.approx(ref_stats["l0l1/grad_norm"], rel=1e-5)
    assert ref_syncs == calls  # scaling in place: one host read per step for the skip decision
    assert runs[(True, True)][2] == 0  # handed to the fused kernel: none
    opt = runs[(True, True)][0].trainer.optimizers[0]
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # cleaned up after each step


@pytest.mark.parametrize("other", [dict(prefix="second/"), dict(nonfinite="zero")])
def test_instances_differing_in_prefix_or_nonfinite_share_a_trainer(other):
    """Lightning refuses two stateful callbacks with one state key ("Found more than one stateful callback"):
    a non-default `prefix` or `nonfinite` is part of the key, the defaults keep the key they always had."""
    first, second = L0L1Clipping(mode="clip", max_norm=0.5), L0L1Clipping(mode="clip", max_norm=0.5, **other)
    assert first.state_key == "L0L1Clipping{'mode': 'clip', 'max_norm': 0.5, 'l0': None, 'l1': None, " \
                              "'norm_type': 2.0, 'estimate': False}"
    assert second.state_key != first.state_key
    trainer(callbacks=[first, second], max_epochs=1).fit(Regressor(make_net()), loader(make_data()))
    assert first.latest()["l0l1/steps"] == 6
    assert second.latest()[f"{other.get('prefix', 'l0l1/')}steps"] == 6


def test_a_checkpoint_saved_before_prefix_entered_the_state_key_still_resumes(tmp_path):
    ds = make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb_a = L0L1Clipping(mode="clip", max_norm=0.5, prefix="x/")
    trainer(callbacks=[cb_a, ckpt], max_epochs=1, enable_checkpointing=True).fit(Regressor(make_net()), loader(ds))
    data = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = data["callbacks"].pop(cb_a.state_key)
    data["callbacks"][L0L1Clipping(mode="clip", max_norm=0.5).state_key] = state  # the key it had before
    torch.save(data, tmp_path / "old.ckpt")
    cb_b = L0L1Clipping(mode="clip", max_norm=0.5, prefix="x/")
    trainer(callbacks=[cb_b], max_epochs=2).fit(Regressor(make_net()), loader(ds), ckpt_path=tmp_path / "old.ckpt")
    assert cb_b.latest()["x/steps"] == 12  # 6 restored + 6 new


@pytest.mark.parametrize("other", [dict(prefix="x/"), dict(nonfinite="zero")])
def test_resuming_under_the_earlier_state_key_gives_no_missing_callback_warning(tmp_path, other):
    """A checkpoint of a callback with a non-default `prefix` or `nonfinite`, saved under the key it had
    before they entered the key: the state resumes (the step count continues) and Lightning does not warn
    that the checkpoint's callbacks are missing (it matches the state to this callback)."""
    ds = make_data()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb_a = L0L1Clipping(mode="clip", max_norm=0.5, **other)
    trainer(callbacks=[cb_a, ckpt], max_epochs=1, enable_checkpointing=True).fit(Regressor(make_net()), loader(ds))
    data = torch.load(tmp_path / "last.ckpt", weights_only=False)
    data["callbacks"][L0L1Clipping(mode="clip", max_norm=0.5).state_key] = data["callbacks"].pop(cb_a.state_key)
    torch.save(data, tmp_path / "old.ckpt")
    cb_b = L0L1Clipping(mode="clip", max_norm=0.5, **other)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(callbacks=[cb_b], max_epochs=2).fit(Regressor(make_net()), loader(ds), ckpt_path=tmp_path / "old.ckpt")
    assert cb_b.latest()[f"{other.get('prefix', 'l0l1/')}steps"] == 12  # 6 restored + 6 new
    assert not [w for w in seen if "L0L1Clipping" in str(w.message) and "callbacks" in str(w.message)]
    assert cb_b.state_key != L0L1Clipping(mode="clip", max_norm=0.5).state_key  # its own key again after


class _LBFGSRegressor(Regressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.net.parameters(), lr=0.1, max_iter=5)


def test_lbfgs_auto_is_refused_and_fixed_modes_scale_every_closure_evaluation():
    """LBFGS calls its closure, and Lightning's `on_before_optimizer_step` with it, several times per step."""
    with pytest.raises(RuntimeError, match="LBFGS evaluates its closure"):
        trainer(callbacks=[L0L1Clipping()], max_steps=2).fit(_LBFGSRegressor(make_net()), loader(make_data()))
    cb, counter = L0L1Clipping(mode="clip", max_norm=0.5), Recorder()
    tr = trainer(callbacks=[cb, counter], max_steps=2)
    tr.fit(_LBFGSRegressor(make_net()), loader(make_data()))
    evaluations = len(counter.norms)
    assert tr.global_step == 2 and evaluations > 2  # several closure evaluations per optimizer step
    assert cb.latest()["l0l1/steps"] == evaluations  # one scaling per gradient evaluation
    assert all(n <= 0.5 * (1 + 1e-5) for n in counter.norms)  # each evaluation's gradient is clipped
