"""Regenerate every figure and table of the paper for which results exist, and say what is missing.

    python main_figures/make_figures.py [--results results] [--out main_figures/out] [--only theory,peers]

Reads the run records of ``results/<experiment>/*.json`` (written by ``harness.RunRecorder``) and writes PNG figures
and Markdown tables (``.md``) to ``--out``, plus ``summary.md`` listing what was made, what is missing and the
command that produces the missing results. The experiment folders own their tables and figures (``GPT-2/figures.py``,
``Mistral-7B/make_table.py``, the diffusion folders' ``make_figure``); they are loaded by file path, and a missing
module or missing results only mark that product as missing. A ``.json`` file that is not valid JSON or not a run
record is named in a WARNING and skipped; everything else is built. Exit status 1 only when a product failed to
build from existing results.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import harness  # noqa: E402
from harness import REPO_ROOT  # noqa: E402
from harness.migrations import DuplicateRecordWarning  # noqa: E402
from harness.records import InvalidRecordWarning  # noqa: E402
from main_figures.lr_robustness import robustness_summary  # noqa: E402
from main_figures.metrics import GRID_NOTE  # noqa: E402
from main_figures.lr_robustness import is_swept, lr_robustness_figure  # noqa: E402
from main_figures.metrics import records_of  # noqa: E402
from main_figures.peers import PEER_PRESETS, has_peer_records, peers_table  # noqa: E402
from main_figures.theory_figures import theory_figure, theory_table  # noqa: E402
from main_figures import width_figures  # noqa: E402
from main_figures import long_tables  # noqa: E402

# The commands that produce each experiment's results (shown when they are missing): CPU first, then paper scale.
PRODUCERS: dict[str, str] = {
    "theory": "python main_figures/theory.py",
    "width": "python main_figures/width.py",
    "gpt2_e2e": "bash GPT-2/scripts/cpu_lr_sweep.sh && bash GPT-2/scripts/cpu_peers.sh "
    "(GPU, paper scale: GPT-2/README.md)",
    "gpt2_runtime": "bash GPT-2/scripts/runtime.sh",
    "glue": "bash Mistral-7B/scripts/sweep.sh minilm_lr && bash Mistral-7B/scripts/sweep.sh minilm_lr_sgd "
    "(GPU, paper Table 2: bash Mistral-7B/scripts/sweep.sh paper)",
    "object_generation": "bash Object_Generation/scripts/tiny_grid.sh "
    "(GPU, paper: bash Object_Generation/scripts/fig1_vase.sh)",
    "mix_of_show": "bash Mix-of-Show/scripts/tiny_grid.sh (GPU, paper: bash Mix-of-Show/scripts/fig3_edlora.sh)",
}


@dataclass
class Product:
    """One figure or table: where its code lives, what it needs, and what it writes."""

    key: str  # for --only
    title: str
    experiments: tuple[str, ...]  # needs records of at least one of these
    output: str  # file name under --out (.png or .md)
    build: Callable[[Path, Path], None]  # (results_dir, out_path) -> writes out_path
    source: str  # where the code lives (for messages)
    produce: str | None = None  # the command that produces its results (default: PRODUCERS of its experiments)

    def command(self) -> str:
        return self.produce or " ; ".join(PRODUCERS.get(e, f"the {e} experiment") for e in self.experiments)


@dataclass
class Outcome:
    product: Product
    status: str  # "ok" | "missing" | "failed"
    detail: str = ""


class MissingSource(LookupError):
    """The module or function that builds a product does not exist (yet)."""


def load_module(path: Path, name: str):
    """Import a module by file path (:func:`harness.load_module`; experiment folders are not packages)."""
    if not path.is_file():
        raise MissingSource(f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path} not found")
    return harness.load_module(path, name)


def find_function(folder: str, function: str, files: tuple[str, ...] | None = None) -> Callable:
    """``function`` from ``folder/<file>`` (the first of ``files``), or from the first ``.py`` of the folder that
    defines it (the diffusion folders' ``make_figure``)."""
    base = REPO_ROOT / folder
    candidates = [base / f for f in files] if files else sorted(base.glob("*.py"))
    if files and not any(p.is_file() for p in candidates):
        raise MissingSource(f"{', '.join(f'{folder}/{f}' for f in files)} not found")
    pattern = re.compile(rf"^def {re.escape(function)}\(", re.MULTILINE)
    for path in candidates:
        if path.is_file() and pattern.search(path.read_text(encoding="utf-8", errors="replace")):
            module = load_module(path, "_mf" + re.sub(r"[^0-9A-Za-z]", "_", str(path.resolve())))  # one name per file
            return getattr(module, function)
    where = ", ".join(f"{folder}/{f}" for f in files) if files else f"any {folder}/*.py"
    raise MissingSource(f"no function {function}() in {where}")


def _table(folder: str, files: tuple[str, ...], function: str) -> Callable[[Path, Path], None]:
    def build(results: Path, out: Path) -> None:
        text = find_function(folder, function, files)(results)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{folder}: {function}() returned {type(text).__name__}, expected Markdown text")
        out.write_text(text.rstrip() + "\n")

    return build


def _figure(folder: str, files: tuple[str, ...] | None, function: str) -> Callable[[Path, Path], None]:
    def build(results: Path, out: Path) -> None:
        find_function(folder, function, files)(results, out)
        if not out.is_file():
            raise FileNotFoundError(f"{folder}: {function}() did not write {out}")

    return build


def _theory_figure(results: Path, out: Path) -> None:
    theory_figure(records_of(results, "theory"), out)


def _theory_table(results: Path, out: Path) -> None:
    out.write_text(theory_table(records_of(results, "theory")))


def _width(function: Callable, study: str = "width") -> Callable[[Path, Path], None]:
    """A product of ``width_figures`` from the records of one study: a figure function (records, path) or a table
    function (records) -> str; missing while the study has no records."""

    def build(results: Path, out: Path) -> None:
        records = records_of(results, "width")
        if not any(r.tags.get("study") == study for r in records):
            raise MissingSource(f"no '{study}' study in the width records; run: python main_figures/width.py")
        if out.suffix == ".md":
            out.write_text(function(records))
        else:
            function(records, out)

    return build


def _glue_lora_scale(results: Path, out: Path) -> None:
    records = records_of(results, "glue")
    if not any(r.tags.get("sweep") == "lora_scale" for r in records):
        raise MissingSource("no 'lora_scale' sweep in the glue records; run: bash Mistral-7B/scripts/sweep.sh "
                            "minilm_lora_scale")
    out.write_text(width_figures.glue_lora_scale_table(records))


def _peers(results: Path, out: Path) -> None:
    out.write_text(peers_table(results))


def _long_table(results: Path, out: Path) -> None:
    out.write_text(long_tables.long_tables(results))


def _long_curves(experiment: str) -> Callable[[Path, Path], None]:
    def build(results: Path, out: Path) -> None:
        try:
            long_tables.loss_curves_figure(results, experiment, out)
        except LookupError as err:  # no long SGD / scaled GD run yet
            raise MissingSource(str(err)) from err

    return build


LONG_COMMAND = "python main_figures/reproduce_cpu.py --only long_e2e_lr_a,long_sst2_lr_a (README: Long CPU runs)"


GPT2 = ("GPT-2", ("figures.py",))
PRODUCTS: tuple[Product, ...] = (
    Product("table1", "Table 1: GPT-2 on E2E", ("gpt2_e2e",), "table1_gpt2_e2e.md",
            _table(*GPT2, "table1"), "GPT-2/figures.py:table1",
            "bash GPT-2/scripts/cpu_table1.sh (GPU, paper scale: GPT-2/README.md)"),
    Product("table2", "Table 2: GLUE (Mistral-7B / MiniLM)", ("glue",), "table2_glue.md",
            _table("Mistral-7B", ("make_table.py",), "make_table"), "Mistral-7B/make_table.py:make_table"),
    Product("loss_curves", "Loss curves (GPT-2 E2E)", ("gpt2_e2e",), "loss_curves_gpt2_e2e.png",
            _figure(*GPT2, "loss_curves"), "GPT-2/figures.py:loss_curves",
            "bash GPT-2/scripts/cpu_loss_curves.sh (GPU: bash GPT-2/scripts/e2e_loss_curves.sh)"),
    Product("runtime", "Runtime (r=4 and r=256)", ("gpt2_runtime",), "runtime.png",
            _figure(*GPT2, "runtime_figure"), "GPT-2/figures.py:runtime_figure"),
    Product("object_generation", "Diffusion grid: object generation", ("object_generation",),
            "object_generation.png", _figure("Object_Generation", None, "make_figure"),
            "Object_Generation/*.py:make_figure"),
    Product("mix_of_show", "Diffusion grid: Mix-of-Show", ("mix_of_show",), "mix_of_show.png",
            _figure("Mix-of-Show", None, "make_figure"), "Mix-of-Show/*.py:make_figure"),
    Product("theory", "Theory: iterations vs condition number", ("theory",), "theory.png", _theory_figure,
            "main_figures/theory_figures.py:theory_figure"),
    Product("theory_table", "Theory: iterations table", ("theory",), "theory_table.md", _theory_table,
            "main_figures/theory_figures.py:theory_table"),
    Product("width_transfer", "Width: loss vs learning rate per width", ("width",), "width_transfer.png",
            _width(width_figures.width_transfer_figure), "main_figures/width_figures.py:width_transfer_figure"),
    Product("width_optimal_lr", "Width: best learning rate vs width", ("width",), "width_optimal_lr.png",
            _width(width_figures.width_optimal_lr_figure), "main_figures/width_figures.py:width_optimal_lr_figure"),
    Product("width_feature_update", "Width: feature update at the best learning rate", ("width",),
            "width_feature_update.png", _width(width_figures.width_feature_figure),
            "main_figures/width_figures.py:width_feature_figure"),
    Product("width_table", "Width: slopes and best learning rates", ("width",), "width_table.md",
            _width(width_figures.width_table), "main_figures/width_figures.py:width_table"),
    Product("lora_scale", "LoRA scale: best learning rate vs alpha / r", ("width",), "lora_scale.png",
            _width(width_figures.lora_scale_figure, "lora_scale"), "main_figures/width_figures.py:lora_scale_figure"),
    Product("lora_scale_table", "LoRA scale: best learning rates", ("width",), "lora_scale_table.md",
            _width(width_figures.lora_scale_table, "lora_scale"), "main_figures/width_figures.py:lora_scale_table"),
    Product("lora_scale_glue_table", "LoRA scale: best learning rates on SST-2 (MiniLM)", ("glue",),
            "lora_scale_glue_table.md", _glue_lora_scale, "main_figures/width_figures.py:glue_lora_scale_table",
            "bash Mistral-7B/scripts/sweep.sh minilm_lora_scale; bash Mistral-7B/scripts/sweep.sh "
            "minilm_lora_scale_rslora"),
    Product("long_runs", "Long CPU runs: best, robustness, flattening", ("gpt2_e2e", "glue"), "long_runs.md",
            _long_table, "main_figures/long_tables.py:long_tables", LONG_COMMAND),
    Product("long_loss_curves_gpt2_e2e", "Long CPU runs: SGD vs scaled GD loss curves (E2E)", ("gpt2_e2e",),
            "long_loss_curves_gpt2_e2e.png", _long_curves("gpt2_e2e"), "main_figures/long_tables.py:loss_curves_figure",
            "python GPT-2/train.py -m sweep=long_curves skip_finished=true resume=auto"),
    Product("long_loss_curves_glue", "Long CPU runs: SGD vs scaled GD loss curves (SST-2)", ("glue",),
            "long_loss_curves_glue.png", _long_curves("glue"), "main_figures/long_tables.py:loss_curves_figure",
            "python Mistral-7B/train.py -m sweep=minilm_long_curves skip_finished=true resume=auto"),
    Product("peers", "Peers side by side (small presets)", tuple(e for e, _, _ in PEER_PRESETS), "peers.md", _peers,
            "main_figures/peers.py:peers_table"),
)  # fmt: skip


SWEPT = ("gpt2_e2e", "glue", "theory")  # experiments expected to sweep the learning rate


def lr_products(results: Path) -> list[Product]:
    """One LR-robustness figure per experiment that sweeps the learning rate (those of :data:`SWEPT`, reported as
    missing until they have a sweep, and any other experiment of ``results`` whose records sweep it)."""
    present = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    extra = [e for e in present if e not in SWEPT and is_swept(records_of(results, e), e)]
    products = []
    for experiment in list(SWEPT) + extra:

        def build(res: Path, out: Path, experiment: str = experiment) -> None:
            records = records_of(res, experiment)
            if not is_swept(records, experiment):
                raise MissingSource(
                    f"the '{experiment}' records do not sweep the learning rate; run: "
                    + PRODUCERS.get(experiment, "an LR sweep")
                )
            lr_robustness_figure(records, experiment, out)

        products.append(Product(f"lr_{experiment}", f"LR robustness: {experiment}", (experiment,),
                                f"lr_robustness_{experiment}.png", build, "main_figures/lr_robustness.py"))  # fmt: skip
    return products


@contextlib.contextmanager
def invalid_files_reported(log, skipped: list[str]):
    """Within the block, each :class:`InvalidRecordWarning` (a results file that is not a run record, skipped by
    ``load_records(on_invalid="warn")``) and each :class:`DuplicateRecordWarning` (two records of one
    configuration: the older is not used) is logged once as ``WARNING: <message>`` and added to ``skipped``; other
    warnings are shown as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", InvalidRecordWarning)
        warnings.simplefilter("always", DuplicateRecordWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, (InvalidRecordWarning, DuplicateRecordWarning)):
                return shown(message, category, filename, lineno, file, line)
            if str(message) not in skipped:
                skipped.append(str(message))
                log(f"WARNING: {message}")

        warnings.showwarning = show
        yield skipped


def build_all(results: Path, out: Path, only: set[str] | None = None, log=print,
              skipped: list[str] | None = None) -> list[Outcome]:  # fmt: skip
    """Build every product (or those in ``only``); never raises because one experiment has no results. Files that
    are not run records are named in a WARNING, skipped, and appended to ``skipped``."""
    skipped = [] if skipped is None else skipped
    with invalid_files_reported(log, skipped):
        return _build_all(results, out, only, log)


def _build_all(results: Path, out: Path, only: set[str] | None, log) -> list[Outcome]:
    products = list(PRODUCTS) + lr_products(results)
    if only:
        known = {p.key for p in products} | {"lr"}
        unknown = sorted(only - known)
        if unknown:
            raise ValueError(f"unknown product(s) {unknown} in --only; known: {sorted(known)}")
        products = [p for p in products if p.key in only or ("lr" in only and p.key.startswith("lr_"))]
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for product in products:
        have = [e for e in product.experiments if records_of(results, e)]
        if product.key == "peers" and not has_peer_records(results):
            have = []
        if not have:
            detail = f"no {'/'.join(product.experiments)} results; run: {product.command()}"
            outcomes.append(Outcome(product, "missing", detail))
            log(f"[missing] {product.title}: {detail}")
            continue
        target = out / product.output
        try:
            product.build(results, target)
            outcomes.append(Outcome(product, "ok", str(target)))
        except MissingSource as err:
            outcomes.append(Outcome(product, "missing", f"{err} ({product.source})"))
        except Exception as err:  # noqa: BLE001 -- one broken product must not stop the others; reported below
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            outcomes.append(Outcome(product, "failed", f"{detail} ({product.source})"))
            log(traceback.format_exc())
        log(f"[{outcomes[-1].status:>7}] {product.title}: {outcomes[-1].detail}")
    return outcomes


def robustness_markdown(results: Path) -> str:
    """The learning-rate robustness of every swept experiment (``metrics.lr_robustness``), as a Markdown section."""
    present = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    rows = [row for e in dict.fromkeys(list(SWEPT) + present) for row in robustness_summary(records_of(results, e), e)]
    if not rows:
        return ""
    return "\n".join([
        "## Learning-rate robustness", "",
        "Per group of comparable runs: the best final metric, and the optimizer with the widest interval of learning "
        "rates within the tolerance of its own best, among the optimizers whose best is within that tolerance of the "
        f"overall best (the others are not ranked). {GRID_NOTE[0].upper()}{GRID_NOTE[1:]}. Width in decades.", "",
        "| experiment | runs | tolerance | best | most robust (width) | not ranked |", "|---|---|---|---|---|---|",
        *rows,
    ]) + "\n"  # fmt: skip


def summary_markdown(outcomes: list[Outcome], out: Path, skipped: list[str] | None = None,
                     robustness: str = "") -> str:  # fmt: skip
    """What was built and what is missing (with the command that produces it), the files that were skipped, and
    the learning-rate robustness section, as Markdown."""
    lines = ["# Figures and tables", "", "Regenerate with `python main_figures/make_figures.py`.", "",
             "| item | status | file / what to run |", "|---|---|---|"]  # fmt: skip
    for o in outcomes:
        where = f"[{o.product.output}]({o.product.output})" if o.status == "ok" else o.detail.replace("|", "\\|")
        lines.append(f"| {o.product.title} | {o.status} | {where} |")
    if skipped:
        title = "## Files not used (not run records, or the older record of one configuration)"
        lines += ["", title, "", *(f"- {s}" for s in skipped)]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + robustness if robustness else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="results folder (records)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "main_figures" / "out", help="output folder")
    parser.add_argument("--only", default="", help="comma-separated product keys (e.g. theory,peers,lr); default all")
    parser.add_argument("--list", action="store_true", help="list the product keys and exit")
    args = parser.parse_args(argv)
    if not args.results.is_dir():  # a typo must not rewrite summary.md as "everything missing"
        print(f"error: results folder '{args.results}' does not exist (nothing was written)", file=sys.stderr)
        return 2
    if args.list:
        for p in list(PRODUCTS) + lr_products(args.results):
            print(f"{p.key:22s} {p.title}  ->  {p.output}")
        return 0
    only = {k.strip() for k in args.only.split(",") if k.strip()} or None
    skipped: list[str] = []
    outcomes = build_all(args.results, args.out, only, skipped=skipped)
    if not only:
        with invalid_files_reported(print, skipped):
            robustness = robustness_markdown(args.results)
        (args.out / "summary.md").write_text(summary_markdown(outcomes, args.out, skipped, robustness))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "missing", "failed")}
    print(f"\n{counts['ok']} built, {counts['missing']} missing, {counts['failed']} failed -> {args.out}")
    for o in outcomes:
        if o.status != "ok":
            print(f"  {o.status}: {o.product.title}: {o.detail}")
    for message in skipped:
        print(f"  WARNING: {message}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
