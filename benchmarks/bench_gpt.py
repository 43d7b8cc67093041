"""Stochastic task: a small GPT on the English text that ships with Python, under AdamW or Adam.

A pre-LN, character-level GPT (token and learned position embeddings; blocks of LayerNorm -> causal
self-attention -> residual, LayerNorm -> 4x GELU MLP -> residual; a final LayerNorm and a linear head)
trained on ``pydoc_data.topics`` with a constant learning rate and no warmup, the same step budget for
every run. The default learning rates go from one where clipping makes no difference (1e-3, also the best
of them at this budget) to one where the first steps spike (1e-1: within the first 10 steps the loss
climbs from 4.6 to ~9 unclipped, to ~7.5 under a hard threshold).

Each learning rate gets: unclipped; ``torch.nn.utils.clip_grad_norm_`` at every threshold of a grid
(those rows do not depend on this package); ``auto`` (nothing tuned), by default through a
``lightning.pytorch`` ``Trainer`` with the :class:`L0L1Clipping` callback, the path users run (``--via loop``:
a plain loop around :class:`lightning_l0l1.GradientClipper`; ``--check-via`` runs the first seed of every
learning rate both ways and reports whether the losses are identical); and the peers at their own
packages' defaults where installed: ``zclip`` (``ZClip()``, ``zclip.step(model)``) and ``smartclip``'s
``AutoClip()`` and ``AGC()`` (``smartclip.apply(model, clipper)``), each called between
``loss.backward()`` and ``opt.step()``.

Every run's result (final loss, the first 10 losses, seconds) goes to a JSON cache next to the report;
``--reuse`` loads it and runs only what is missing, and ``auto`` again (the only configuration that
depends on this package), so after a change to auto's rule only auto is re-run.

    python benchmarks/bench_gpt.py --optimizer adamw     # results/bench_gpt_adamw.md and .json
    python benchmarks/bench_gpt.py --optimizer adam      # results/bench_gpt_adam.md and .json
    python benchmarks/bench_gpt.py --optimizer adamw --reuse   # re-run auto only, reuse the rest
    python benchmarks/bench_gpt.py --optimizer adamw --reuse --check-via   # and auto via both paths
    python benchmarks/bench_gpt.py --quick               # smoke test (writes nothing)

One torch thread by default (``--threads``): on a shared 2-core machine a 2-thread run slowed 3-20x
whenever another process ran; one run of the default model takes 7-9 s on one x86_64 core.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _via
from _common import emit, machine, table, windows
from bench_lstm import corpus

GRID = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: peer configuration -> the module it needs
PEERS = {"zclip": "zclip", "autoclip": "smartclip", "agc": "smartclip"}
OPTIMIZERS = {
    "adamw": "AdamW (betas 0.9, 0.95, weight decay 0.1 on every parameter)",
    "adam": "Adam (betas 0.9, 0.95, no weight decay)",
}
#: the settings a cached run must share with this invocation to be reused
SETTINGS = ("optimizer", "steps", "layers", "d_model", "heads", "ctx", "batch", "threads")
RESULTS = Path(__file__).resolve().parent / "results"


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        # GPT-2's initialization: N(0, 0.02), the residual projections scaled down by sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def make_optimizer(model: nn.Module, optimizer: str, lr: float) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))


def package_id() -> str:
    """Which ``lightning_l0l1`` auto runs with: the repository's commit, and whether the sources differ from it."""
    import lightning_l0l1

    root = Path(lightning_l0l1.__file__).resolve().parent
    files = sorted(root.rglob("*.py"))

    def git(*cmd: str) -> str:
        repo = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        listed = [ln.split("\t", 1) for ln in git("ls-tree", "-r", "HEAD", "lightning_l0l1").splitlines()]
        here = git("hash-object", *map(str, files)).split()
    except (OSError, subprocess.CalledProcessError):
        return f"lightning_l0l1 from {root} (no git)"
    committed = {path: meta.split()[2] for meta, path in listed if path.endswith(".py")}
    mine = {f"lightning_l0l1/{f.relative_to(root).as_posix()}": h for f, h in zip(files, here)}
    return f"lightning_l0l1 at commit {commit}" + ("" if mine == committed else " with local changes")


def peer_module(config: str) -> Optional[Any]:
    """The module a peer configuration needs, or None where it is not importable."""
    try:
        return importlib.import_module(PEERS[config])
    except ImportError:
        return None


def make_clip(config: str, model: nn.Module) -> Optional[Callable[[torch.optim.Optimizer], Any]]:
    """What a configuration other than ``auto`` runs between ``loss.backward()`` and ``opt.step()``, as each
    package documents it."""
    if config == "unclipped":
        return None
    if config.startswith("clip="):
        max_norm = float(config.split("=")[1])
        return lambda opt: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    module = peer_module(config)
    if module is None:
        raise ImportError(f"{PEERS[config]} is not installed")
    if config == "zclip":
        zclip = module.ZClip()  # alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, warmup_steps 25, zscore mode
        return lambda opt: zclip.step(model)
    peer = module.AutoClip() if config == "autoclip" else module.AGC()
    return lambda opt: module.apply(model, peer)


def batches(ids: torch.Tensor, seed: int, args) -> Iterator[torch.Tensor]:
    """``args.steps`` batches of random windows of ``args.ctx + 1`` tokens, drawn from the seed's own generator."""
    return windows(ids, seed, args.steps, args.batch, args.ctx + 1)


def gpt_loss(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(chunk[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())


def train(config: str, seed: int, lr: float, ids: torch.Tensor, vocab: int, args) -> dict[str, Any]:
    """Final training loss (mean over the last 10% of steps; inf if it diverged), the first 10 losses, seconds.

    ``auto`` runs through ``args.via`` (a ``Trainer`` with the callback, or the plain loop); every other
    configuration in the plain loop.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = GPT(vocab, args.d_model, args.layers, args.heads, args.ctx)
    opt = make_optimizer(model, args.optimizer, lr)
    clipper = {"mode": "auto", "snapshot": getattr(args, "snapshot", None)} if config == "auto" else None
    before = None if config == "auto" else make_clip(config, model)
    losses = _via.run(model, opt, batches(ids, seed, args), gpt_loss, clipper, getattr(args, "via", "loop"),
                      args.steps, stop_above=50, before_step=before)
    diverged = len(losses) < args.steps or any(not math.isfinite(v) or v > 50 for v in losses)
    final = math.inf if diverged else statistics.mean(losses[-max(1, args.steps // 10) :])
    return {"final": final, "first10": losses[:10], "seconds": time.perf_counter() - t0}


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def save_cache(path: Path, settings: dict[str, Any], runs: dict[tuple[float, int, str], dict[str, Any]]) -> None:
    records = [
        {"optimizer": settings["optimizer"], "lr": lr, "seed": seed, "config": config,
         "final": _finite_or_none(r["final"]), "first10": [_finite_or_none(x) for x in r["first10"]],
         "seconds": round(r["seconds"], 3), **({"package": r["package"]} if "package" in r else {})}
        for (lr, seed, config), r in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
    head = json.dumps({"torch": torch.__version__, "settings": settings, "machine": machine()}, indent=1)
    body = ",\n".join("  " + json.dumps(r) for r in records)  # one run a line
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head[: head.rindex("}")].rstrip() + ',\n "runs": [\n' + body + "\n ]\n}\n")


def load_cache(path: Path, settings: dict[str, Any]) -> dict[tuple[float, int, str], dict[str, Any]]:
    """The cached runs of ``path``; SystemExit where it was made by another torch or with other settings."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("torch") != torch.__version__:
        raise SystemExit(f"--reuse: {path} was made with torch {data.get('torch')}, this is torch "
                         f"{torch.__version__}; run without --reuse to redo every run")
    if data.get("settings") != settings:
        raise SystemExit(f"--reuse: {path} was made with settings {data.get('settings')}, these are {settings}; "
                         "run without --reuse to redo every run")
    nan = float("nan")
    return {
        (float(r["lr"]), int(r["seed"]), r["config"]): {
            "final": math.inf if r["final"] is None else float(r["final"]),
            "first10": [nan if x is None else float(x) for x in r["first10"]],
            "seconds": float(r["seconds"]),
            **({"package": r["package"]} if "package" in r else {}),
        }
        for r in data["runs"]
    }


def _parse_list(ap: argparse.ArgumentParser, text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--{what} takes comma-separated positive numbers, got {text!r}")
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        ap.error(f"--{what} takes comma-separated positive numbers, got {text!r}")
    return values


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing unless --json is given")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    ap.add_argument("--lrs", type=str, default="1e-3,1e-2,3e-2,1e-1",
                    help="comma-separated learning rates (default: from fine unclipped to early loss spikes)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--configs", type=str, default=None,
                    help="comma-separated subset of unclipped, clip=<threshold>, auto, zclip, autoclip, agc "
                         "(default: all, the thresholds " + ", ".join(f"{t:g}" for t in GRID) + ")")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a 2-thread run slowed 3-20x whenever another process shared "
                         "the 2 cores; the losses depend on it in the last digits, so the cache records it)")
    ap.add_argument("--snapshot", choices=["sampled", "full"], default="sampled",
                    help="auto's snapshot (full: the exact differences, for comparison); a full-snapshot run writes "
                         "results/bench_gpt_<optimizer>_full_snapshot.md/.json by default")
    ap.add_argument("--via", choices=_via.VIA, default="lightning",
                    help="how auto runs: a Trainer with the L0L1Clipping callback (default), or a plain loop around "
                         "GradientClipper")
    ap.add_argument("--check-via", action="store_true",
                    help="also run auto's first seed at every lr through the other path and report whether the "
                         "losses are identical")
    ap.add_argument("--reuse", action="store_true",
                    help="load the JSON cache; run only the missing runs and auto (the rest do not depend on this "
                         "package)")
    ap.add_argument("--out", type=Path, default=None, help="the report (default results/bench_gpt_<optimizer>.md)")
    ap.add_argument("--json", type=Path, default=None,
                    help="the raw results cache (default results/bench_gpt_<optimizer>.json)")
    args = ap.parse_args(argv)
    lrs = _parse_list(ap, args.lrs, "lrs")
    configs = ["unclipped", *[f"clip={t:g}" for t in GRID], "auto", *PEERS]
    if args.quick:
        args.steps, args.layers, args.d_model, args.heads, args.ctx, args.batch, args.seeds = 10, 1, 16, 2, 16, 4, 1
        lrs = [3e-3] if args.lrs == ap.get_default("lrs") else lrs
        configs = ["unclipped", "clip=0.5", "auto"]
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in ("unclipped", "auto", *PEERS) and not c.startswith("clip=")]
        bad += [c for c in configs if c.startswith("clip=") and not _is_positive(c.split("=", 1)[1])]
        if bad or not any(c.startswith("clip=") for c in configs):
            ap.error("--configs takes unclipped, clip=<threshold>, auto, zclip, autoclip, agc, with at least one "
                     f"clip=<threshold>; got {args.configs!r}")
    if args.seeds < 1:
        ap.error("--seeds takes a positive number")
    stem = f"bench_gpt_{args.optimizer}" + ("_full_snapshot" if args.snapshot == "full" else "")
    out = args.out or RESULTS / f"{stem}.md"
    cache_path = args.json or RESULTS / f"{stem}.json"
    write_cache = not args.quick or args.json is not None
    settings = {k: getattr(args, k) for k in SETTINGS}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_all(args, lrs, configs, settings, out, cache_path, write_cache)
    finally:
        torch.set_num_threads(threads)  # a test process keeps its own


def run_all(args, lrs: list[float], configs: list[str], settings: dict[str, Any], out: Path, cache_path: Path,
            write_cache: bool) -> str:
    """Every (lr, seed, configuration) not cached, then the report."""
    ids, vocab = corpus()

    missing = {c for c in configs if c in PEERS and peer_module(c) is None}
    runs: dict[tuple[float, int, str], dict[str, Any]] = {}
    if args.reuse:
        runs = {k: r for k, r in load_cache(cache_path, settings).items() if k[2] != "auto"}
    package = package_id() if "auto" in configs else ""
    t0 = time.time()
    computed = 0
    for lr in lrs:
        for seed in range(args.seeds):
            for c in configs:
                if (lr, seed, c) in runs:
                    r = runs[(lr, seed, c)]
                    print(f"lr {lr:g} seed {seed} {c:>10}: {r['final']:.4f} (cached)", flush=True)
                    continue
                if c in missing:
                    continue
                r = runs[(lr, seed, c)] = train(c, seed, lr, ids, vocab, args)
                if c == "auto":
                    r["package"] = f"{package}, via {args.via}"
                computed += 1
                print(f"lr {lr:g} seed {seed} {c:>10}: {r['final']:.4f} ({r['seconds']:.1f} s)", flush=True)
                if write_cache:
                    save_cache(cache_path, settings, runs)
    checks = check_via(lrs, runs, ids, vocab, args) if args.check_via and "auto" in configs else ""
    elapsed = time.time() - t0
    # a peer not installed here whose runs are all cached is reported from the cache
    missing = {c for c in missing if not all((lr, s, c) in runs for lr in lrs for s in range(args.seeds))}
    n_params = sum(p.numel() for p in GPT(vocab, args.d_model, args.layers, args.heads, args.ctx).parameters())
    text = report(lrs, configs, missing, runs, args, n_params, elapsed, computed, f"{package}, via {args.via}")
    return emit(text + checks, out, args.quick)


def check_via(lrs: list[float], runs: dict, ids: torch.Tensor, vocab: int, args) -> str:
    """auto's first seed at every lr through the other path: whether its losses are those of the table's run."""
    other = next(v for v in _via.VIA if v != args.via)
    rows = []
    for lr in lrs:
        again = train("auto", 0, lr, ids, vocab, argparse.Namespace(**{**vars(args), "via": other}))
        first, mine = again["first10"], runs[(lr, 0, "auto")]["first10"]
        same = first == mine and (again["final"] == runs[(lr, 0, "auto")]["final"])
        rows.append([f"{lr:g}", _fmt(runs[(lr, 0, "auto")]["final"]), _fmt(again["final"]),
                     "identical" if same else "DIFFERENT"])
        print(f"lr {lr:g} seed 0 auto via {other}: {again['final']:.4f} ({'identical' if same else 'DIFFERENT'})",
              flush=True)
    return (f"\nauto, seed 0, via {args.via} (the table) and via {other}: final loss and whether every loss "
            "of the run is the same:\n\n" + table(["lr", f"via {args.via}", f"via {other}", "losses"], rows) + "\n")


def _is_positive(text: str) -> bool:
    try:
        return float(text) > 0 and math.isfinite(float(text))
    except ValueError:
        return False


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "diverged"


def _ratio(a: float, b: float) -> str:
    if not math.isfinite(b):
        return "-"
    return f"{a / b:.3f}" if math.isfinite(a) else "inf"


def _lr_rows(lr: float, configs: list[str], missing: set[str], runs: dict, seeds: int) -> tuple[list, list, list]:
    """One learning rate's summary row, its row of every configuration's mean, and its early-spike row."""
    clips = [c for c in configs if c.startswith("clip=")]
    res = {c: [runs[(lr, s, c)] for s in range(seeds)] for c in configs if c not in missing}
    finals = {c: [r["final"] for r in rs] for c, rs in res.items()}
    means = {c: statistics.mean(v) if all(math.isfinite(x) for x in v) else math.inf for c, v in finals.items()}
    best = min(clips, key=lambda c: means[c])
    edge = " (grid edge)" if len(clips) > 1 and best in (clips[0], clips[-1]) else ""
    inf = math.inf
    # a cell: "not installed" for a peer that is not, "-" for a configuration not run
    na = {c: "not installed" if c in missing else "-" for c in ("unclipped", "auto", *PEERS) if c not in means}
    auto = means.get("auto", inf)
    worst = (_ratio(max(a / b for a, b in zip(finals["auto"], finals[best])), 1.0)
             if "auto" in means and all(math.isfinite(x) for x in finals[best]) else "-")
    summary = [
        f"{lr:g}", na.get("unclipped") or _fmt(means["unclipped"]), best.split("=")[1] + edge, _fmt(means[best]),
        na.get("auto") or _fmt(auto), na.get("auto") or _ratio(auto, means[best]), worst,
        na.get("auto") or na.get("unclipped") or _ratio(auto, means["unclipped"]),
        *[na.get(p) or _ratio(means[p], means[best]) for p in PEERS],
    ]
    every, early = [f"{lr:g}"], [f"{lr:g}"]
    for c in configs:
        if c not in means:
            every.append(na[c])
            early.append(na[c])
            continue
        every.append(_fmt(means[c]) + (" *" if c == best else ""))
        # the highest of the first 10 losses, mean over the seeds (nan where one diverged within them)
        early.append(f"{statistics.mean(max(r['first10']) for r in res[c]):.2f}")
    return summary, every, early


def report(lrs: list[float], configs: list[str], missing: set[str], runs: dict, args, n_params: int,
           elapsed: float, computed: int, package: str) -> str:
    clips = [c for c in configs if c.startswith("clip=")]
    rows, every, early = zip(*(_lr_rows(lr, configs, missing, runs, args.seeds) for lr in lrs))
    seconds = [r["seconds"] for (lr, seed, c), r in runs.items() if lr in lrs and seed < args.seeds and c in configs]
    peers = (" Peers at their packages' defaults: zclip `ZClip()` (z-score mode, alpha 0.97, z_thresh 2.5, "
             "max_grad_norm 1.0, 25 warm-up steps), smartclip `AutoClip()` (median + 3 sd of all norms seen, global, "
             "no clipping for the first 100 steps) and `AGC()` (clipping 0.01 per parameter tensor, biases and "
             "norm gains excluded)." if any(c in PEERS for c in configs) else "")
    auto = f" auto: {package}." if package else ""
    header = (
        f"Machine: {machine()}\n\nGPT (pre-LN, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
        f"context {args.ctx}, {n_params:,} parameters), char level on pydoc_data.topics, "
        f"{OPTIMIZERS[args.optimizer]}, constant lr, no warmup, {args.steps} steps of {args.batch} x {args.ctx} "
        f"tokens, {args.seeds} seed{'s' if args.seeds > 1 else ''} per cell; training loss = mean of the last 10% "
        "of steps, averaged over the seeds (diverged: a loss > 50 or not finite); thresholds "
        f"{', '.join(c.split('=')[1] for c in clips)} (torch.nn.utils.clip_grad_norm_).{peers}{auto} "
        f"{len(seconds)} runs, {sum(seconds):.0f} s of training ({statistics.mean(seconds) if seconds else 0:.1f} s "
        f"per run); this invocation ran {computed} of them in {elapsed:.0f} s\n\n"
    )
    return (
        header
        + table(["lr", "unclipped", "best threshold", "its loss", "auto", "auto / best", "worst seed",
                 "auto / unclipped", *[f"{p} / best" for p in PEERS]], rows)
        + "\n\nEvery configuration (mean loss; * the best threshold at that lr):\n\n"
        + table(["lr", *configs], every)
        + "\n\nEarly spikes: the highest of the first 10 losses (mean over the seeds; nan: diverged):\n\n"
        + table(["lr", *configs], early)
        + "\n"
    )


if __name__ == "__main__":
    main()
