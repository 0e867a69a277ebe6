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


def cosine_tau(step: float, total_steps: float, tau_min: float, tau_max: float,
               period_fraction: float = 1.0) -> float:
    """ACTION++'s adaptive temperature schedule (ATS): ``tau_min + 0.5 (1 + cos(2 pi t / T)) (tau_max - tau_min)``
    with ``T = period_fraction * total_steps``.

    It starts at ``tau_max`` (``t = 0``), reaches ``tau_min`` at ``T / 2`` and is back at ``tau_max`` at ``T``; it is
    periodic with period ``T``. The paper's best setting is one cycle over training (``period_fraction = 1.0``),
    evaluated per iteration; the released 2D code uses ``period_fraction = 0.1`` evaluated per epoch.

    Args:
        step: current iteration ``t >= 0`` (steps past ``total_steps`` continue the cosine).
        total_steps: number of training iterations (> 0).
        tau_min, tau_max: bounds, ``0 < tau_min <= tau_max`` (paper: 0.1 and 1.0).
        period_fraction: the period as a fraction of ``total_steps`` (> 0).

    Raises:
        ValueError: naming the offending argument.
    """
    if step < 0:
        raise ValueError(f'step must be >= 0, got {step}')
    if not total_steps > 0:
        raise ValueError(f'total_steps must be > 0, got {total_steps}')
    if not 0 < tau_min <= tau_max:
        raise ValueError(f'need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}')
    if not period_fraction > 0:
        raise ValueError(f'period_fraction must be > 0, got {period_fraction}')
    period = period_fraction * total_steps
    return float(tau_min + 0.5 * (1.0 + math.cos(2.0 * math.pi * step / period)) * (tau_max - tau_min))
