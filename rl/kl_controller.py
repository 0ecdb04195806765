"""KL-penalty coefficient controllers (Ziegler et al. 2019): fixed, or adapted toward a target KL.

The adaptive rule: e = clip(KL / target - 1, -0.2, 0.2); β ← β (1 + e · n / horizon), n being the
number of rollout samples since the last update. Plain Python floats: the coefficient enters the
jitted experience step as an argument, so changing it never recompiles.
"""

from __future__ import annotations

import gin


@gin.configurable
class KLController:
    """β for the per-token penalty -β (log π - log π_ref); `adaptive` tracks `target` KL."""

    def __init__(self, *, init_coef: float = 0.05, adaptive: bool = False, target: float = 6.0,
                 horizon: int = 10000):
        if init_coef < 0:
            raise ValueError(f"KLController.init_coef must be >= 0, got {init_coef}")
        if adaptive and (target <= 0 or horizon <= 0):
            raise ValueError(f"KLController: adaptive needs target > 0 and horizon > 0, got "
                             f"target={target}, horizon={horizon}")
        self.value, self.adaptive, self.target, self.horizon = float(init_coef), adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        """Updates β from the measured per-sequence KL of the last rollout; returns the new β."""
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value
