r"""MkDocs hooks: the benchmark results page, and the formulas rendered to MathML at build time.

``docs/benchmarks.md`` is filled with the stored results in ``benchmarks/results/*.md``: each results
file becomes one section, preceded by a line with the command that produced it and the machine it ran
on (the file's ``Machine:`` line). The page is regenerated at every build, so re-running a benchmark
updates the site with no other edit.

Formulas (``pymdownx.arithmatex``'s ``\(...\)`` and ``\[...\]`` spans) are converted to MathML by
``latex2mathml`` (installed with the ``docs`` extra), which browsers render natively: the site
loads no script or stylesheet from another host and shows its formulas offline (``mkdocs serve``,
a copied ``site/``). A formula it cannot convert fails the build.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- benchmark-results -->"

# Results files written with non-default arguments (the commands are those in README.md and
# benchmarks/bench_lstm.py's docstring); any other file comes from ``python benchmarks/<name>.py``.
COMMANDS = {
    "bench_lstm_12seeds": "python benchmarks/bench_lstm.py --seeds 12"
    " --configs clip=0.1,clip=0.25,clip=1,auto,auto+probe --out benchmarks/results/bench_lstm_12seeds.md",
    "bench_lstm_lrs": "python benchmarks/bench_lstm.py --lrs 5,20,50,100 --out benchmarks/results/bench_lstm_lrs.md",
    "bench_lstm_lrs_momentum": "python benchmarks/bench_lstm.py --via loop --optimizer sgd-momentum --lrs 0.5,2,5,10"
    " --out benchmarks/results/bench_lstm_lrs_momentum.md",
    "bench_lstm_lrs_adamw": "python benchmarks/bench_lstm.py --via loop --optimizer adamw --lrs 0.003,0.01,0.03"
    " --out benchmarks/results/bench_lstm_lrs_adamw.md",
    "bench_gpt_adamw": "python benchmarks/bench_gpt.py --optimizer adamw --check-via",
    "bench_gpt_early_final": "python benchmarks/bench_gpt_early.py --initial-steps 0.1,0.2,0.3 --thresholds 0.5"
    " --steps 300 --seeds 3 --out benchmarks/results/bench_gpt_early_final.md",
    "bench_gpt_adam": "python benchmarks/bench_gpt.py --optimizer adam",
    "bench_gpt_adamw_full_snapshot": "python benchmarks/bench_gpt.py --optimizer adamw --snapshot full"
    " --configs clip=0.05,auto",
}

# The order of the sections; files not listed follow in alphabetical order.
ORDER = [
    "bench_step", "bench_launches", "bench_gpu", "bench_e2e", "bench_stats", "bench_layer_norms", "bench_memory",
    "bench_cosh", "bench_lstm",
    "bench_lstm_12seeds", "bench_lstm_lrs", "bench_lstm_lrs_momentum", "bench_lstm_lrs_adamw", "bench_gpt_adamw",
    "bench_gpt_adam", "bench_gpt_early", "bench_gpt_early_final", "bench_lstm_demo", "bench_secant_accuracy",
    "bench_gpt_adamw_full_snapshot",
]

TITLES = {
    "bench_step": "Per-step cost of the gradient work",
    "bench_launches": "Device operations and host reads per step, by number of tensors",
    "bench_gpu": "GPT-2-small-shaped parameters on a GPU",
    "bench_e2e": "Share of a real training step",
    "bench_stats": "What the statistics add",
    "bench_layer_norms": "What the per-layer norms add",
    "bench_memory": "Peak extra memory",
    "bench_cosh": "Convergence on cosh, with known constants",
    "bench_lstm": "Character LSTM, SGD at lr 20, every threshold against auto",
    "bench_lstm_12seeds": "Character LSTM, twelve seeds",
    "bench_lstm_lrs": "Character LSTM, plain SGD across learning rates",
    "bench_lstm_lrs_momentum": "Character LSTM, SGD with momentum across learning rates",
    "bench_lstm_lrs_adamw": "Character LSTM, AdamW across learning rates",
    "bench_gpt_adamw": "Small GPT, AdamW across learning rates, with ZClip, AutoClip and AGC",
    "bench_gpt_adam": "Small GPT, Adam across learning rates, with ZClip, AutoClip and AGC",
    "bench_gpt_early": "Small GPT, AdamW: the first 20 steps over 8 seeds, by auto's first-step bound",
    "bench_gpt_early_final": "Small GPT, AdamW: the first 20 steps and the final loss, by auto's first-step bound",
    "bench_lstm_demo": "Lightning's LSTM demo model: the first 50 steps",
    "bench_secant_accuracy": "The sampled snapshot's secant against the exact one",
    "bench_gpt_adamw_full_snapshot": "Small GPT, AdamW: auto with the full snapshot",
}


def _command(stem: str) -> str:
    if stem in COMMANDS:
        return COMMANDS[stem]
    script = stem if (ROOT / "benchmarks" / f"{stem}.py").exists() else stem.rsplit("_", 1)[0]
    return f"python benchmarks/{script}.py"


def _section(path: Path) -> str:
    stem = path.stem
    lines = path.read_text(encoding="utf-8").splitlines()
    machine = None
    body = []
    for line in lines:
        m = re.match(r"\s*Machine:\s*(.+)", line)
        if m and machine is None:
            machine = m.group(1).strip()
            continue
        # Headings inside a results file sit below this page's section headings.
        h = re.match(r"(#{1,5})\s", line)
        body.append("#" * max(len(h.group(1)), 3) + line[len(h.group(1)):] if h else line)
    machine_text = machine or "not recorded in the results file (iteration counts, independent of the machine)"
    title = TITLES.get(stem, stem)
    return "\n".join([
        f"## {title}",
        "",
        f"Command: `{_command(stem)}` &middot; machine: {machine_text} &middot; "
        f"stored in `benchmarks/results/{path.name}`.",
        "",
        *body,
        "",
    ])


def results_markdown() -> str:
    files = {p.stem: p for p in sorted(RESULTS.glob("*.md"))}
    stems = [s for s in ORDER if s in files] + sorted(s for s in files if s not in ORDER)
    return "\n".join(_section(files[s]) for s in stems)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "benchmarks.md" and MARKER in markdown:
        return markdown.replace(MARKER, results_markdown())
    return markdown


_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>',
    re.DOTALL,
)


def render_math(page_html: str) -> str:
    """Every arithmatex formula of a page as MathML (``display="block"`` for ``\\[...\\]``)."""
    from latex2mathml.converter import convert

    def one(m: re.Match[str]) -> str:
        tex = html.unescape(m.group("tex")).strip()
        display = "block" if m.group("open") == "\\[" else "inline"
        try:
            mathml = convert(tex, display=display)
        except Exception as err:  # a formula the converter does not know: fail the build, name it
            raise ValueError(f"cannot render the formula {tex!r} to MathML: {err}") from err
        return f'<{m.group("tag")} class="arithmatex">{mathml}</{m.group("tag")}>'

    return _MATH.sub(one, page_html)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "api.md":
        # the callback is documented from its implementation class: users create `L0L1Clipping`
        # (the heading says so through the `heading` option; the signature's name is text)
        html_text = html_text.replace(">L0L1ClippingBase<", ">L0L1Clipping<")
    return render_math(html_text) if 'class="arithmatex"' in html_text else html_text


def on_serve(server: Any, **kwargs: Any) -> Any:
    server.watch(str(RESULTS))
    return server
