"""What the example scripts share: the data, the models, the command line, the W&B logger, the plots.

Not part of the package: the scripts import it as ``from _shared import ...`` (Python puts
the script's own folder first on ``sys.path``). Every dataset is made here or ships with
Python, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
WANDB_PROJECT = "lightning_l0l1-examples"


# ----------------------------------------------------------------------------------------- data
def char_data(seq_len: int, n_seqs: int) -> tuple[TensorDataset, int]:
    """``n_seqs`` next-character sequences of ``seq_len`` from Python's own English docs; (dataset, vocab)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    need = seq_len * n_seqs + 1
    if need > len(text):
        raise ValueError(f"`seq_len * n_seqs` must be below {len(text)} characters, got {seq_len} * {n_seqs}.")
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text[:need]])
    return TensorDataset(ids[:-1].view(n_seqs, seq_len), ids[1:].view(n_seqs, seq_len)), len(vocab)


def regression_data(n: int, dim: int = 16, seed: int = 0) -> TensorDataset:
    """``y = 3 sin(x . w) + noise`` with ``x`` in R^dim: a smooth target a small MLP fits in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g) / math.sqrt(dim)
    y = 3 * torch.sin(x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def mlp(dim: int, hidden: int, depth: int = 2) -> nn.Sequential:
    """``depth`` tanh hidden layers of width ``hidden`` and a scalar output."""
    layers: list[nn.Module] = []
    width = dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 1))


def char_lstm_module(vocab: int, hidden: int, lr: float, layers: int = 1):
    """A character LSTM language model (embedding, LSTM, linear head) trained by plain SGD at ``lr``."""
    import pytorch_lightning as pl

    class CharLSTM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lr = lr
            self.embed = nn.Embedding(vocab, hidden)
            self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

        def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            out, _ = self.lstm(self.embed(x))
            return nn.functional.cross_entropy(self.head(out).flatten(0, 1), y.flatten())

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return CharLSTM()


# ----------------------------------------------------------------------------------------- command line, W&B
def example_parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """A parser whose ``--help`` starts with the script's docstring ``doc``, line breaks kept."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    """``--seed``: the one seed of the initial weights and the data order."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (weights and data order)")


def parse_example_args(
    parser: argparse.ArgumentParser, argv: Optional[list[str]], *positive: str
) -> argparse.Namespace:
    """Add the output flags (last in ``--help``), parse ``argv`` and require the integer flags ``positive`` >= 1."""
    add_output_args(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, *positive)
    return args


def parse_char_lm_args(
    parser: argparse.ArgumentParser, argv: Optional[list[str]], *positive: str
) -> argparse.Namespace:
    """``parse_example_args``, then the usage errors for sizes of the character LSTM task the text cannot supply."""
    args = parse_example_args(parser, argv, *positive)
    check_char_lm_args(parser, args)
    return args


def parse_loop_args(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    """For the hand-written loops on the regression data: after the script's own flags, add ``--steps``,
    ``--hidden``, ``--batch-size``, ``--seed``, ``--log-every`` and the output flags; parse ``argv`` (sizes >= 1)."""
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    add_seed_arg(parser)
    parser.add_argument("--log-every", type=int, default=10, help="W&B logging interval in steps")
    return parse_example_args(parser, argv, "steps", "hidden", "batch_size", "log_every")


def add_output_args(parser: argparse.ArgumentParser, wandb: bool = True) -> None:
    """``--out``, ``--no-progress`` and (``wandb``) ``--no-wandb`` / ``--wandb-online``."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs, summaries and W&B files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    if wandb:
        parser.add_argument("--no-wandb", action="store_true", help="no W&B logging")
        parser.add_argument(
            "--wandb-online", action="store_true", help="log to W&B online (default: offline, no account needed)"
        )


def add_char_lm_args(parser: argparse.ArgumentParser, seqs: int = 2048) -> None:
    """The size of the character LSTM task: ``--hidden``, ``--seq-len``, ``--seqs``, ``--batch-size``."""
    parser.add_argument("--hidden", type=int, default=64, help="LSTM width")
    parser.add_argument("--seq-len", type=int, default=64, help="characters per sequence")
    parser.add_argument("--seqs", type=int, default=seqs, help="training sequences")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")


def check_char_lm_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for sizes the text cannot supply: too many characters, or fewer sequences than a batch."""
    require_positive(parser, args, "hidden", "seq_len", "seqs", "batch_size")
    from pydoc_data.topics import topics

    chars = sum(len(v) for v in topics.values()) + len(topics) - 1
    most = (chars - 1) // args.seq_len
    if args.seqs > most:
        parser.error(f"--seqs {args.seqs} x --seq-len {args.seq_len} needs more text than there is: "
                     f"at most {most} sequences of {args.seq_len} characters")
    if args.seqs < args.batch_size:
        parser.error(f"--seqs ({args.seqs}) must be at least --batch-size ({args.batch_size}): "
                     "incomplete batches are dropped")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a usage error naming the flag and the value if an integer flag is below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def fit_char_lm(args: argparse.Namespace, lr: float, callbacks: list, name: str, group: Optional[str] = None,
                seed: int = 0, **trainer_kwargs: Any):
    """Train the character LSTM (``add_char_lm_args`` sizes) with SGD at ``lr``; returns (trainer, vocab size).

    Seeds everything with ``seed`` first, so runs that differ only in ``lr`` and ``callbacks``
    see the same initial weights and the same batches. The W&B run is closed even on error.
    """
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    pl.seed_everything(seed, verbose=False)
    ds, vocab = char_data(args.seq_len, args.seqs)
    model = char_lstm_module(vocab, args.hidden, lr)
    logger = make_logger(args, name, group=group)
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=callbacks, logger=logger, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=not args.no_progress, **trainer_kwargs,
    )
    try:
        trainer.fit(model, DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True))
    finally:
        finish_wandb(logger)
    return trainer, vocab


def fit_char_lm_for_steps(
    args: argparse.Namespace, lr: float, callbacks: list, name: str, group: str, seed: int
) -> tuple[Any, int]:
    """``fit_char_lm`` for exactly ``--steps`` optimizer steps (as many epochs as that takes), logging every 10."""
    return fit_char_lm(args, lr, callbacks, name, group=group, seed=seed, max_steps=args.steps, max_epochs=-1,
                       log_every_n_steps=10)


def wandb_available(args: argparse.Namespace) -> bool:
    if getattr(args, "no_wandb", True):
        return False
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def make_logger(args: argparse.Namespace, name: str, group: Optional[str] = None):
    """A ``WandbLogger`` (offline unless ``--wandb-online``) when wandb is importable, else ``False`` (no logger)."""
    if not wandb_available(args):
        return False
    from pytorch_lightning.loggers import WandbLogger

    args.out.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=WANDB_PROJECT, name=name, group=group, offline=not args.wandb_online, save_dir=str(args.out)
    )


def wandb_run(args: argparse.Namespace, name: str, config: dict[str, Any]):
    """For the loops without Lightning: a ``wandb`` run (offline unless ``--wandb-online``), or ``None``."""
    if not wandb_available(args):
        return None
    import wandb

    args.out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=WANDB_PROJECT, name=name, config=config, dir=str(args.out),
        mode="online" if args.wandb_online else "offline",
    )


def finish_wandb(logger: Any) -> None:
    """Close the W&B run a logger opened (the next run in the same process starts a new one)."""
    if logger:
        import wandb

        wandb.finish()


def progress(iterable: Iterable, total: int, args: argparse.Namespace, desc: str) -> Iterable:
    """A tqdm progress bar over ``iterable`` (tqdm comes with Lightning), unless ``--no-progress``."""
    if getattr(args, "no_progress", False):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of Lightning
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def print_summary(title: str, summary: dict[str, float], width: int = 22,
                  echo: Callable[[str], Any] = print) -> None:
    """``title``, then a line ``  name  value`` (4 significant digits) per entry, through ``echo``."""
    echo(title)
    for k, v in summary.items():
        echo(f"  {k:{width}s} {v:.4g}")


# ----------------------------------------------------------------------------------------- plots, numbers
def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9})
    return plt


def save_png(fig: Any, path: Path) -> None:
    """Lay ``fig`` out tightly, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figure_and_data(out: Path, stem: str, draw: Callable[[Path], None], data: Any) -> tuple[Path, Path]:
    """``draw(OUT/stem.png)``, then ``data`` to ``OUT/stem.json`` (non-finite numbers as null); both paths."""
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / f"{stem}.png", out / f"{stem}.json"
    draw(png)
    js.write_text(json.dumps(json_safe(data), indent=1))
    return png, js


def fmt(x: float) -> str:
    """A number for a summary line: 4 significant digits, ``n/a`` where it is not finite (no estimate yet)."""
    return f"{x:.4g}" if math.isfinite(x) else "n/a"


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (standard JSON has no NaN or Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (NaN-aware: a window with a non-finite value is NaN)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc) if all(math.isfinite(a) for a in acc) else math.nan)
    return out


# ----------------------------------------------------------------------------------------- recording
def recorder(clip: Any = None):
    """A callback that keeps, per optimizer step, the loss and (``clip`` given) ``clip.latest()``.

    Put it *after* the clipping callback in ``callbacks``: ``latest()`` then holds this step's
    statistics. It reads the host every step (``float(loss)``, ``latest()``): fine for an
    example's plots, not what the clipping callback itself does.
    """
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if outputs is None:
                return
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            row = {"step": float(trainer.global_step), "loss": float(loss)}
            if clip is not None:
                row.update(clip.latest())
            self.rows.append(row)

    return Recorder()


def fitted_constants(stats: dict[str, float]) -> tuple[float, float]:
    """The (L0, L1) that ``L0L1Clipping.latest()`` reports from its online fit; NaN for one not there."""
    return stats.get("l0l1/L0", math.nan), stats.get("l0l1/L1", math.nan)


class LoopRecord:
    """A hand-written loop's record: per step the loss and the global gradient norm before and after clipping.

    Use it as a context manager: it opens a W&B run (``wandb_run``, config ``vars(args)``) unless
    ``wandb`` is false or W&B is off, and finishes it on the way out, even on error. The values are
    kept as tensors, so nothing is read on the host in the loop except the W&B row every
    ``--log-every`` steps.
    """

    def __init__(self, args: argparse.Namespace, name: str, wandb: bool = True) -> None:
        self.run = wandb_run(args, name, vars(args)) if wandb else None
        self.log_every: int = args.log_every
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def __enter__(self) -> LoopRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.run is not None:
            self.run.finish()

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor, after: torch.Tensor) -> None:
        """Step ``step``'s loss, gradient norm before clipping (``norm``) and after (``after``)."""
        self.losses.append(loss.detach())
        self.norms.append(norm.detach())
        self.after.append(after)
        if self.run is not None and (step + 1) % self.log_every == 0:
            row = {"train_loss": loss.detach(), "grad_norm": norm.detach(), "grad_norm_scaled": after}
            self.run.log({k: float(v) for k, v in row.items()}, step=step)

    def summary(self, *names: str) -> dict[str, float]:
        """The statistics ``names``, in that order, of: ``steps``, ``first_loss``, ``final_loss`` (the mean
        over the last tenth of the steps), ``mean_grad_norm``, ``max_grad_norm``, ``max_grad_norm_after``
        and ``clipped_fraction`` (the steps whose norm the clipping lowered)."""
        losses, norms, after = torch.stack(self.losses), torch.stack(self.norms), torch.stack(self.after)
        tail = max(1, len(self.losses) // 10)
        stats = {
            "steps": float(len(self.losses)),
            "first_loss": float(losses[0]),
            "final_loss": float(losses[-tail:].mean()),
            "mean_grad_norm": float(norms.mean()),
            "max_grad_norm": float(norms.max()),
            "max_grad_norm_after": float(after.max()),
            "clipped_fraction": float((after < norms * (1 - 1e-4)).float().mean()),
        }
        return {k: stats[k] for k in names}


def plain_log_ticks(ax, axis: str = "both") -> None:
    """Log-axis tick labels as plain numbers (0.2, 0.5, 1, 2 ...), minor ones at 2x and 5x only."""
    from matplotlib.ticker import FuncFormatter

    def major(v: float, _pos: int) -> str:
        return f"{v:g}"

    def minor(v: float, _pos: int) -> str:
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:g}" if mantissa in (2.0, 5.0) else ""

    for a in ([ax.xaxis, ax.yaxis] if axis == "both" else [getattr(ax, f"{axis}axis")]):
        a.set_major_formatter(FuncFormatter(major))
        a.set_minor_formatter(FuncFormatter(minor))
