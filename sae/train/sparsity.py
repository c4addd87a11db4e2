"""The sparsity penalty's coefficient over training: a linear warm-up, or a controller that holds L0
at a target.

ReLU (L1), JumpReLU (L0) and Gated SAEs trade reconstruction against a penalty whose right
coefficient depends on the data's scale, the width and the run's length: the published defaults land
at L0 in the hundreds on a transcoder of a real model's MLP (issue "Transcoders that train out of the
box"). With ``sae.target_l0`` set the coefficient is steered instead: every ``interval`` steps the
L0 of the current batch, extrapolated ``horizon`` readings ahead along its trend, is compared with
the target and the coefficient multiplied by ``(L0 / target) ** gain`` (at most ``e**max_log_step``
either way): an integral controller in log space, damped by the trend. The target itself anneals:
from the first reading it falls geometrically to ``target_l0`` over the first ``anneal`` (half) of
the run. A latent whose ReLU or gate closes on every input gets no gradient to reopen, so L0 only
ratchets down, and a controller aiming at the final target at once overshoots (a ReLU transcoder of
a tiny GPT-2: FVU 0.199 at L0 14 for a target of 32 with 33% of its latents silent; annealed: 0.054
at L0 29 with 18%).

It starts at the configured coefficient and replaces the linear warm-up (starting it at the
warm-up's 1 / sparsity_warmup_steps instead made the coefficient overshoot on the way up: a ReLU
transcoder of a tiny GPT-2 collapsed to L0 2 with FVU 1.0). Its state is part of the trainer's
checkpoint, and the L0 it reads is averaged over data-parallel ranks, so a resumed or distributed
run follows the same coefficients.
"""

from __future__ import annotations

import math
from typing import Any

MAX_LOG_MULTIPLIER = math.log(1e4)


class SparsityController:
    """The factor the trainer passes to a family's loss as ``sparsity_scale``."""

    def __init__(self, target_l0: float = 0.0, warmup_steps: int = 0, *, interval: int = 10, gain: float = 0.5,
                 max_log_step: float = 0.5, horizon: float = 8.0, total_steps: int = 0, anneal: float = 0.5):
        if target_l0 < 0 or not math.isfinite(target_l0):
            raise ValueError(f"sae.target_l0={target_l0} must be a finite number >= 0 (0: a fixed coefficient)")
        self.target_l0 = float(target_l0)
        self.warmup_steps = int(warmup_steps)
        self.interval, self.gain, self.max_log_step = interval, gain, max_log_step
        self.horizon = horizon
        self.total_steps, self.anneal = int(total_steps), float(anneal)
        self.log_multiplier = 0.0
        self.last_log_l0: float | None = None
        self.first_log_l0: float | None = None

    @property
    def active(self) -> bool:
        return self.target_l0 > 0

    def scale(self, step: int) -> float:
        if self.active:
            return math.exp(self.log_multiplier)
        warm = self.warmup_steps
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def wants_l0(self, step: int) -> bool:
        """Whether ``observe`` is to be called after ``step`` (the same steps on every rank)."""
        return self.active and (step + 1) % self.interval == 0

    def log_target(self, step: int) -> float:
        """log(1 + the L0 aimed at after ``step``): from the first reading down to the target over the
        first ``anneal`` of the run, geometrically, then the target."""
        final = math.log(self.target_l0 + 1.0)
        span = self.anneal * self.total_steps
        if self.first_log_l0 is None or span <= 0 or self.first_log_l0 <= final:
            return final
        return final + (self.first_log_l0 - final) * max(0.0, 1.0 - (step + 1) / span)

    def observe(self, l0: float, step: int = 0) -> None:
        if not math.isfinite(l0):
            return
        log_l0 = math.log(l0 + 1.0)
        if self.first_log_l0 is None:
            self.first_log_l0 = log_l0
        # The error expected ``horizon`` readings ahead at L0's current trend: L0 follows the
        # coefficient with a lag (the weights move at the learning rate), and a controller on the
        # present error alone keeps raising the coefficient while L0 is already falling towards the
        # target, then overshoots (a Gated transcoder of a tiny GPT-2: L0 249 -> 5 for a target of 68).
        trend = 0.0 if self.last_log_l0 is None else log_l0 - self.last_log_l0
        self.last_log_l0 = log_l0
        err = log_l0 - self.log_target(step) + self.horizon * trend
        change = max(-self.max_log_step, min(self.max_log_step, self.gain * err))
        # Bounded (1e-4 to 1e4 times the configured coefficient): a target the family cannot reach
        # in this run (its thresholds move at their learning rate) must not wind the coefficient up.
        self.log_multiplier = max(-MAX_LOG_MULTIPLIER, min(MAX_LOG_MULTIPLIER, self.log_multiplier + change))

    def state_dict(self) -> dict[str, Any]:
        return {"target_l0": self.target_l0, "log_multiplier": self.log_multiplier, "last_log_l0": self.last_log_l0,
                "first_log_l0": self.first_log_l0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["target_l0"]) != self.target_l0:
            raise ValueError(f"the checkpoint was trained towards sae.target_l0={state['target_l0']}, this run "
                             f"asks for {self.target_l0}: resume with the same sae.target_l0, or start a new run")
        self.log_multiplier = float(state["log_multiplier"])
        self.last_log_l0, self.first_log_l0 = state.get("last_log_l0"), state.get("first_log_l0")
