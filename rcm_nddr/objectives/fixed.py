"""``fixed``: the weighted sum of the task losses with the configured weights (the default)."""

from __future__ import annotations

from rcm_nddr.objectives.weighting import WEIGHTINGS, Weighting


@WEIGHTINGS.register("fixed")
class FixedWeighting(Weighting):
    """``L = sum_t w_t L_t`` with ``w_t`` = ``loss.<task>.weight`` (or the task type's default weight)."""
