"""One matplotlib style for every figure of ``main_figures/``: PNG, white background, readable labels, and a
fixed color / marker / label per optimizer so that a method looks the same in every plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "apply_style", "optimizer_style", "optimizer_label", "optimizer_sort_key", "savefig", "OPTIMIZER_ORDER", "DPI",
]  # fmt: skip

DPI = 150

# Paper's optimizers first, then the peers users would otherwise pick (colorblind-safe Okabe-Ito palette).
_STYLES: dict[str, dict] = {
    "sgd": {"label": "SGD", "color": "#E69F00", "marker": "s", "linestyle": "--"},
    "scaled_gd": {"label": "scaled GD", "color": "#D55E00", "marker": "o", "linestyle": "-"},
    "adamw": {"label": "AdamW", "color": "#56B4E9", "marker": "^", "linestyle": "--"},
    "scaled_adamw": {"label": "scaled AdamW", "color": "#0072B2", "marker": "D", "linestyle": "-"},
    "peft_riemannian": {"label": "PEFT Riemannian", "color": "#009E73", "marker": "v", "linestyle": "-."},
    "loraplus": {"label": "LoRA+", "color": "#CC79A7", "marker": "P", "linestyle": "-."},
    "lora_rite": {"label": "LoRA-RITE", "color": "#000000", "marker": "X", "linestyle": ":"},
}
OPTIMIZER_ORDER = tuple(_STYLES)
_EXTRA_COLORS = ["#999999", "#F0E442", "#882255", "#44AA99"]


def apply_style() -> None:
    """Set the shared rcParams (call before building a figure)."""
    plt.rcParams.update(
        {
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "figure.facecolor": "white",
            "savefig.facecolor": "white",
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8.5,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "grid.linestyle": "-",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "lines.linewidth": 1.6,
            "lines.markersize": 5,
        }
    )


def optimizer_style(name: str) -> dict:
    """``label``, ``color``, ``marker``, ``linestyle`` of an optimizer (a stable fallback for unknown names)."""
    if name in _STYLES:
        return dict(_STYLES[name])
    color = _EXTRA_COLORS[sum(map(ord, name)) % len(_EXTRA_COLORS)]
    return {"label": name, "color": color, "marker": "*", "linestyle": "-"}


def optimizer_label(name: str) -> str:
    """Display name of an optimizer, e.g. ``scaled_adamw`` -> ``scaled AdamW``."""
    return optimizer_style(name)["label"]


def optimizer_sort_key(name: str) -> tuple[int, str]:
    """Sort optimizers in the paper's order, peers after, unknown names last (alphabetically)."""
    return (OPTIMIZER_ORDER.index(name) if name in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER), name)


def savefig(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG (creating the folder), close it, and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG, got the file name '{path}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
