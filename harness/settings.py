"""Every setting an experiment uses, checked before anything is loaded: one table of rules per experiment
(:data:`Rule`), read by one checker (:func:`check_settings`). A setting that is used only after training
(decoding, sampling, scoring) is checked here too, so that a typo never costs a finished training.

    check_settings(cfg, GPT2_RULES)   # ValueError: "decode.num_beams=0: must be an integer >= 1"

Each rule names a dotted key and what its value may be: an integer or a number in a range, one of a set of
choices, a non-empty list of integers; ``none`` says whether null is allowed (and what it means, for the message).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Rule", "check_settings", "setting", "RUN_RULES", "TRAINING_RULES"]

_MISSING = object()  # setting(): no default given
_ABSENT = object()  # check_settings(): the key is not in the config


@dataclass(frozen=True)
class Rule:
    """What the value of ``key`` may be.

    kind: ``int`` (a whole number, not a bool), ``float`` (any real number, finite), ``choice`` (one of
    ``choices``), ``int_list`` (a non-empty list of whole numbers), ``bool``.
    minimum / maximum: inclusive bounds (``above``: a strict lower bound) for ``int`` and ``float``.
    none: null allowed (``none_means`` says what it does, for the message).
    also: further allowed values outside the range (e.g. ``-1`` for Trainer's "no step limit").
    """

    key: str
    kind: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple = ()
    none: bool = False
    none_means: str = ""
    also: tuple = ()

    def allowed(self) -> str:
        if self.kind == "choice":
            text = f"one of {list(self.choices)}"
        elif self.kind == "int_list":
            text = "a non-empty list of integers"
        elif self.kind == "bool":
            text = "true or false"
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            bounds = []
            if self.above is not None:
                bounds.append(f"> {self.above:g}")
            if self.minimum is not None:
                bounds.append(f">= {self.minimum:g}")
            if self.maximum is not None:
                bounds.append(f"<= {self.maximum:g}")
            text += (" " + " and ".join(bounds)) if bounds else ""
        if self.also:
            text += f" (or {', '.join(repr(a) for a in self.also)})"
        if self.none:
            text += f", or null{f' ({self.none_means})' if self.none_means else ''}"
        return text

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.none
        if value in self.also and not isinstance(value, bool):
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "int_list":
            return (isinstance(value, (list, tuple)) and len(value) > 0
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return ((self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above))


def setting(cfg: Any, dotted: str, default: Any = _MISSING) -> Any:
    """The value of the dotted key in a config (a DictConfig or a dict); ``default`` when a part is absent (a
    KeyError naming the key without one)."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            if default is _MISSING:
                raise KeyError(f"config key {dotted} is missing") from None
            return default
    if hasattr(node, "_content"):  # an OmegaConf node: a plain value
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    return node


def check_settings(cfg: Any, rules: Iterable[Rule]) -> None:
    """Raise one ``ValueError`` listing every key of ``rules`` whose value is not allowed (key, value and what it
    may be); an absent key is left to the experiment's own defaults."""
    problems = []
    for rule in rules:
        value = setting(cfg, rule.key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if not rule.ok(value):
            problems.append(f"{rule.key}={value!r}: must be {rule.allowed()}")
    if problems:
        raise ValueError("bad setting" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems))


# The rules of every experiment's run: its seed and CPU threads.
RUN_RULES = (
    Rule("seed", "int"),
    Rule("threads", "int", minimum=1, none=True, none_means="torch's default"),
)
# The rules every experiment trained by harness.train_loop shares (its keys under train.*).
TRAINING_RULES = (
    *RUN_RULES,
    Rule("train.batch_size", "int", minimum=1),
    Rule("train.grad_clip", "float", above=0, none=True, none_means="no clipping"),
)
