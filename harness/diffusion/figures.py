"""The diffusion experiments' figures and tables, from their run records and sample strips.

* :func:`save_strip` / :func:`load_strip`: one run's samples side by side in one PNG;
* :func:`image_grid`, :func:`black_share_figure`: the LR x optimizer grid of sample panels with the black-image
  share under each; :func:`records_table`: the records as a Markdown table;
* :func:`select_records` and :func:`figure_main`: what the two ``make_figure.py`` share (their command line).

What it uses: PIL and the run records (no model).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..paths import REPO_ROOT
from ..records import load_records

__all__ = [
    "image_grid", "save_strip", "load_strip", "black_share_figure", "records_table", "select_records",
    "figure_main",
]  # fmt: skip


def image_grid(cells: dict[tuple[str, str], Sequence], rows: Sequence[str], cols: Sequence[str],
               footers: dict[tuple[str, str], str] | None = None, thumb: int = 96, per_row: int | None = None,
               title: str | None = None):
    """One PIL figure: a panel per (row, col) label pair holding its images (tiled ``per_row`` across), the row
    label on the left, the column label on top and ``footers[(row, col)]`` (e.g. the black-image share) printed
    under each panel. Missing cells stay empty."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda text: int(measure.textlength(str(text), font=font)) + 4  # noqa: E731
    counts = [len(v) for v in cells.values()] or [1]
    per_row = per_row or max(1, math.ceil(math.sqrt(max(counts))))
    lines = max(1, math.ceil(max(counts) / per_row))
    pad, head_h, foot_h = 8, 18, 18
    label_w = max(text_w(r) for r in rows) + pad
    title_h = 20 if title else 0
    cell_w = max([per_row * thumb] + [text_w(c) for c in cols] + [text_w(f) for f in (footers or {}).values()])
    cell_h = lines * thumb
    width = max(label_w + len(cols) * (cell_w + pad) + pad, text_w(title) + 2 * pad if title else 0)
    height = title_h + head_h + len(rows) * (cell_h + foot_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    for j, col in enumerate(cols):
        draw.text((label_w + j * (cell_w + pad) + pad, title_h + 4), str(col), fill="black", font=font)
    for i, row in enumerate(rows):
        y = title_h + head_h + i * (cell_h + foot_h + pad)
        draw.text((pad, y + cell_h // 2), str(row), fill="black", font=font)
        for j, col in enumerate(cols):
            x = label_w + j * (cell_w + pad) + pad
            for k, image in enumerate(cells.get((row, col), ())):
                tile = image.resize((thumb, thumb), Image.NEAREST)
                canvas.paste(tile, (x + (k % per_row) * thumb, y + (k // per_row) * thumb))
            if footers and (row, col) in footers:
                draw.text((x, y + cell_h + 3), footers[(row, col)], fill="black", font=font)
    return canvas


def save_strip(images: Sequence, path: str | Path) -> Path:
    """Save PIL images of one size side by side in one PNG (the samples of one run)."""
    if not images:
        raise ValueError("no images to save")
    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, image in enumerate(images):
        strip.paste(image, (i * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def load_strip(path: str | Path) -> list:
    """The square images of a strip written by :func:`save_strip`."""
    strip = Image.open(path).convert("RGB")
    side = strip.size[1]
    return [strip.crop((i * side, 0, (i + 1) * side, side)) for i in range(strip.size[0] // side)]


def black_share_figure(records: Sequence, samples_dir: str | Path, column: Callable, column_label: Callable,
                       out_png: str | Path, title: str, thumb: int = 64) -> Path:
    """The LR x optimizer grid of the diffusion experiments: one panel of samples per record (rows = optimizer,
    columns = ``column(record)`` sorted high to low, labelled ``column_label(value)``), with the black-image share
    (and the divergence step, if any) printed under each panel. Samples are read from
    ``samples_dir/<run_name>.png``."""
    if not records:
        raise ValueError(f"no run records to draw for {title!r}")
    order = {"sgd": 0, "scaled_gd": 1, "adamw": 2, "scaled_adamw": 3}
    rows = sorted({r.optimizer for r in records}, key=lambda o: (order.get(o, 9), o))
    values = sorted({column(r) for r in records}, reverse=True)
    cols = [column_label(v) for v in values]
    cells, footers = {}, {}
    for r in records:
        key = (r.optimizer, column_label(column(r)))
        strip = Path(samples_dir) / f"{r.run_name}.png"
        cells[key] = load_strip(strip) if strip.is_file() else []
        m = r.final_metrics
        text = f"black {m.get('black_count', '?')}/{m.get('num_images', '?')}"
        if m.get("diverged_at_step"):
            text += f", diverged @{m['diverged_at_step']}"
        footers[key] = text
    figure = image_grid(cells, rows, cols, footers, thumb=thumb, per_row=4, title=title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out_png)
    return out_png


def records_table(records: Sequence, columns: Sequence[tuple[str, Callable]]) -> str:
    """A Markdown table with one row per record and ``columns`` = ``[(header, record -> value), ...]``
    (floats printed with 4 significant digits)."""
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(f(r)) for _, f in columns) + " |" for r in records]
    return "\n".join(lines)


def select_records(results_dir: str | Path, experiment: str, concept: str, preset: str | None) -> tuple[str, list]:
    """``(preset, records)`` of ``concept`` in ``results_dir/<experiment>``; ``preset`` defaults to ``full`` if
    recorded, else ``tiny``. No record is a clear error listing the presets found."""
    records = [r for r in load_records(results_dir, experiment) if r.tags.get("concept") == concept]
    presets = {r.tags.get("preset") for r in records}
    preset = preset or ("full" if "full" in presets else "tiny")
    records = [r for r in records if r.tags.get("preset") == preset]
    if not records:
        raise ValueError(f"no {experiment} records for concept {concept!r}, preset {preset!r} in {results_dir} "
                         f"(presets found: {sorted(p for p in presets if p)})")
    return preset, records


def figure_main(description: str, experiment: str, default_concept: str, make_figure: Callable,
                table: Sequence[tuple[str, Callable]], sort_key: Callable, argv: Sequence[str] | None = None) -> None:
    """The command line of a ``make_figure.py``: draw ``make_figure(results_dir, out, concept, preset)`` or, with
    ``--table``, print the records as a Markdown table (rows sorted by ``sort_key``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "results"))
    parser.add_argument("--concept", default=default_concept)
    parser.add_argument("--preset", default=None, help="full | tiny (default: full if recorded, else tiny)")
    parser.add_argument("--out", default=None, help="default: <results-dir>/<experiment>/figure_<concept>_<preset>.png")
    parser.add_argument("--table", action="store_true", help="print the records as a Markdown table instead")
    args = parser.parse_args(argv)
    preset, records = select_records(args.results_dir, experiment, args.concept, args.preset)
    if args.table:
        print(records_table(sorted(records, key=sort_key), table))
    else:
        out = args.out or Path(args.results_dir) / experiment / f"figure_{args.concept}_{preset}.png"
        print(make_figure(args.results_dir, out, args.concept, preset))
