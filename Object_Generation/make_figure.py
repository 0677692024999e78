"""Paper Figure 1 (vase) / the chair figure from the records in results/object_generation/: rows = optimizer,
columns = text-encoder LR (with its reg and fusion scale), one panel of samples per run and the share of black
images under each panel. ``--table`` prints the records as the Markdown table of the README instead.

    python Object_Generation/make_figure.py                      # vase, full-scale runs if any, else tiny ones
    python Object_Generation/make_figure.py --concept chair --preset tiny --out /tmp/chair.png
    python Object_Generation/make_figure.py --table
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

from harness.diffusion.figures import black_share_figure, figure_main, select_records  # noqa: E402

EXPERIMENT = "object_generation"
TABLE = [
    ("optimizer", lambda r: r.optimizer), ("variant", lambda r: r.tags.get("variant", "")),
    ("text lr", lambda r: r.hparams["text_lr"]),
    ("text reg", lambda r: r.hparams["text_reg"] if "reg" in r.hparams else "–"),
    ("fusion", lambda r: r.hparams["fusion_scale"]), ("steps", lambda r: r.final_metrics.get("steps_done")),
    ("final loss", lambda r: r.final_metrics.get("final_loss")),
    ("text LoRA ‖ΔW‖", lambda r: r.final_metrics.get("text_lora_delta")),
    ("UNet LoRA ‖ΔW‖", lambda r: r.final_metrics.get("unet_lora_delta")),
    ("token emb. ‖Δ‖", lambda r: r.final_metrics.get("token_embedding_delta")),
    ("black", lambda r: f"{r.final_metrics.get('black_count')}/{r.final_metrics.get('num_images')}"),
    ("step s", lambda r: r.step_time_s),
]


def make_figure(results_dir: str | Path, out_png: str | Path, concept: str = "vase", preset: str | None = None) -> Path:
    """Draw the LR x optimizer grid of ``concept`` (runs of ``preset``, ablation variants left out) from
    ``results_dir/object_generation/`` into ``out_png``; returns its path."""
    preset, records = select_records(results_dir, EXPERIMENT, concept, preset)
    records = [r for r in records if not r.tags.get("variant")]
    settings = {r.hparams["text_lr"]: (r.hparams["text_reg"], r.hparams["fusion_scale"]) for r in records}

    def label(text_lr: float) -> str:
        reg, fusion = settings[text_lr]
        return f"text lr {text_lr:g}, reg {reg:g}, fusion {fusion:g}"

    steps = sorted({r.hparams.get("steps") for r in records})
    title = (f"Object generation ({preset}): {concept}, UNet lr {records[0].hparams['lr']:g}, "
             f"{'/'.join(map(str, steps))} steps; black = all-dark or NaN images")
    return black_share_figure(records, Path(results_dir) / EXPERIMENT / "samples", lambda r: r.hparams["text_lr"],
                              label, out_png, title)


if __name__ == "__main__":
    figure_main(__doc__.splitlines()[0], EXPERIMENT, "vase", make_figure, TABLE,
                sort_key=lambda r: (r.tags.get("variant", ""), r.optimizer, -r.hparams["text_lr"]))
