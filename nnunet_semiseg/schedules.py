"""Schedules used by the trainers: consistency ramp-ups (Mean Teacher) and the cosine temperature of ACTION++."""
import math


def sigmoid_rampup(step: float, rampup_length: float) -> float:
    """Laine & Aila / Tarvainen & Valpola ramp-up: ``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)``.
    Returns 1.0 when ``rampup_length`` is 0 (no ramp)."""
    if rampup_length < 0:
        raise ValueError(f'rampup_length must be >= 0, got {rampup_length}')
    if rampup_length == 0:
        return 1.0
    t = min(max(step / rampup_length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(step: float, rampup_length: float) -> float:
    """``clip(step / rampup_length, 0, 1)``; 1.0 when ``rampup_length`` is 0."""
    if rampup_length < 0:
        raise ValueError(f'rampup_length must be >= 0, got {rampup_length}')
    if rampup_length == 0:
        return 1.0
    return float(min(max(step / rampup_length, 0.0), 1.0))
