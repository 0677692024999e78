"""Paper Figure 3 (Mix-of-Show) from the records in results/mix_of_show/: rows = optimizer, columns = the
(text, UNet) learning-rate pair (with its reg and fusion scale), one panel of "a pencil sketch of <V>" samples per
run and the share of black images under each panel. ``--table`` prints the records as the README's Markdown table.

    python Mix-of-Show/make_figure.py                            # dog, full-scale runs if any, else tiny ones
    python Mix-of-Show/make_figure.py --concept vase --preset tiny --out /tmp/mos.png
    python Mix-of-Show/make_figure.py --table
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

from harness.diffusion.figures import black_share_figure, figure_main, select_records  # noqa: E402

EXPERIMENT = "mix_of_show"
TABLE = [
    ("optimizer", lambda r: r.optimizer), ("variant", lambda r: r.tags.get("variant", "")),
    ("text lr", lambda r: r.hparams["text_lr"]), ("UNet lr", lambda r: r.hparams["lr"]),
    ("reg", lambda r: r.hparams["text_reg"] if "reg" in r.hparams else "–"),
    ("fusion", lambda r: r.hparams["fusion_scale"]), ("steps", lambda r: r.final_metrics.get("steps_done")),
    ("final loss", lambda r: r.final_metrics.get("final_loss")),
    ("text LoRA ‖ΔW‖", lambda r: r.final_metrics.get("text_lora_delta")),
    ("UNet LoRA ‖ΔW‖", lambda r: r.final_metrics.get("unet_lora_delta")),
    ("token emb. ‖Δ‖", lambda r: r.final_metrics.get("token_embedding_delta")),
    ("token emb. norm", lambda r: r.final_metrics.get("token_embedding_norm")),
    ("black", lambda r: f"{r.final_metrics.get('black_count')}/{r.final_metrics.get('num_images')}"),
    ("step s", lambda r: r.step_time_s),
]


def make_figure(results_dir: str | Path, out_png: str | Path, concept: str = "dog", preset: str | None = None) -> Path:
    """Draw the LR-pair x optimizer grid of ``concept`` (runs of ``preset``, ablation variants left out) from
    ``results_dir/mix_of_show/`` into ``out_png``; returns its path."""
    preset, records = select_records(results_dir, EXPERIMENT, concept, preset)
    records = [r for r in records if not r.tags.get("variant")]
    pair = lambda r: (r.hparams["text_lr"], r.hparams["lr"])  # noqa: E731
    settings = {pair(r): (r.hparams["text_reg"], r.hparams["fusion_scale"]) for r in records}

    def label(lrs: tuple[float, float]) -> str:
        reg, fusion = settings[lrs]
        return f"text {lrs[0]:g} / unet {lrs[1]:g}, reg {reg:g}, fusion {fusion:g}"

    steps = sorted({r.hparams.get("steps") for r in records})
    title = (f"Mix-of-Show EDLoRA ({preset}): {concept}, {'/'.join(map(str, steps))} steps, "
             f"'a pencil sketch of <V>'; black = all-dark or NaN images")
    return black_share_figure(records, Path(results_dir) / EXPERIMENT / "samples", pair, label, out_png, title)


if __name__ == "__main__":
    figure_main(__doc__.splitlines()[0], EXPERIMENT, "dog", make_figure, TABLE,
                sort_key=lambda r: (r.tags.get("variant", ""), r.optimizer, -r.hparams["text_lr"]))
