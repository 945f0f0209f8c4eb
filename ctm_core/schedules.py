"""Loss-weight schedules as first-class values: what sweeps vary for lambda_DSM and lambda_GAN.

One frozen dataclass covers the forms the paper and the official code use:
off, constant, "off until step k then a linear/cosine ramp to a value", and VQGAN-style
adaptive weighting (the official code's default for DSM and GAN) on top of any of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

_SHORT = re.compile(
    r"^(?P<value>[0-9.eE+-]+)(?:@(?P<start>\d+))?(?:\+(?P<ramp>\d+)(?P<shape>cos)?)?(?P<adaptive>:adaptive)?$")


@dataclass(frozen=True)
class WeightSchedule:
    """lambda(step): 0 before `start`, ramps to `value` over `ramp_steps`, then `value`.

    If `adaptive`, the trainer multiplies lambda(step) by ||grad L_CTM|| / ||grad L_term|| at the
    network's last layer, clamped to [adaptive_min, adaptive_max] (the official code's balance).
    """

    value: float = 0.0
    start: int = 0
    ramp_steps: int = 0
    shape: Literal["linear", "cosine"] = "linear"
    adaptive: bool = False
    adaptive_min: float = 0.0
    adaptive_max: float = 1e4

    def __post_init__(self) -> None:
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"value must be a finite number >= 0 (a loss weight), got {self.value!r}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {self.shape!r}")
        if not 0 <= self.adaptive_min <= self.adaptive_max:
            raise ValueError(f"adaptive_min/adaptive_max must satisfy 0 <= min <= max, "
                             f"got {self.adaptive_min}, {self.adaptive_max}")

    def __call__(self, step: int) -> float:
        if self.value == 0 or step < self.start:
            return 0.0
        if self.ramp_steps == 0 or step >= self.start + self.ramp_steps:
            return float(self.value)
        frac = (step - self.start + 1) / (self.ramp_steps + 1)
        if self.shape == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        return float(self.value) * frac

    def is_active(self, step: int) -> bool:
        """Whether the term must be computed at this step (skipping saves its forward pass)."""
        return self(step) > 0

    @property
    def is_off(self) -> bool:
        return self.value == 0

    def label(self) -> str:
        """The short form parse() reads back: '0.1@200+100cos:adaptive', 'off', '1'."""
        if self.is_off:
            return "off"
        text = f"{self.value:g}"
        if self.start:
            text += f"@{self.start}"
        if self.ramp_steps:
            text += f"+{self.ramp_steps}" + ("cos" if self.shape == "cosine" else "")
        if self.adaptive:
            text += ":adaptive"
        return text

    @classmethod
    def parse(cls, text: str, **defaults) -> "WeightSchedule":
        """Read the short form: VALUE[@START][+RAMP[cos]][:adaptive], or 'off'."""
        text = str(text).strip()
        if text == "off":
            return cls(value=0.0, **defaults)
        match = _SHORT.match(text)
        if not match:
            raise ValueError(f"cannot read weight schedule {text!r}; expected 'off' or "
                             "VALUE[@START][+RAMP[cos]][:adaptive], e.g. '0.1@50000+1000cos:adaptive'")
        kwargs = dict(defaults)
        kwargs["value"] = float(match["value"])
        if match["start"]:
            kwargs["start"] = int(match["start"])
        if match["ramp"]:
            kwargs["ramp_steps"] = int(match["ramp"])
            kwargs["shape"] = "cosine" if match["shape"] else "linear"
        if match["adaptive"]:
            kwargs["adaptive"] = True
        return cls(**kwargs)


def learning_rate(step: int, lr: float, warmup_steps: int, decay: Literal["none", "linear", "cosine"],
                  total_steps: int) -> float:
    """lr at `step` (0-based): linear warm-up over `warmup_steps`, then optionally decayed to 0 at
    `total_steps`. A pure function of the step, so a resumed run sets exactly the lr it would have."""
    if decay not in ("none", "linear", "cosine"):
        raise ValueError(f"decay must be 'none', 'linear' or 'cosine', got {decay!r}")
    value = lr * min(1.0, (step + 1) / max(1, warmup_steps))
    if decay == "none":
        return value
    done = min(1.0, step / max(1, total_steps))
    return value * ((1 - done) if decay == "linear" else 0.5 * (1 + math.cos(math.pi * done)))
