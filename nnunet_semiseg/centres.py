"""Uniformly spread class centres on the unit sphere, for ACTION++'s adaptive supervised contrast (ASCL).

ACTION++ (You et al., MICCAI 2023, arXiv 2304.02689) pre-computes ``K`` class centres ``psi_c`` on ``S^{D-1}`` that
minimise the uniformity loss ``L_unif = mean_c log sum_{c'} exp(psi_c . psi_c' / tau)`` and states that for
``D >= K - 1`` the optimum is a regular simplex. The released procedure (Adam on ``L_unif`` with the self term,
``tau = 0.07``) stalls far from the simplex (spec ``action.md`` §3.2), so here:

* ``K <= D + 1``: the regular simplex in closed form (exact: unit norm, pairwise cosine ``-1/(K-1)``, sum 0),
  rotated into ``D`` dimensions by a seeded random orthonormal basis;
* ``K > D + 1`` (no simplex exists): Adam on ``L_unif`` **without** the self term (``tau = 0.25``, lr ``2e-2`` with
  cosine decay, 1000 steps, float64), which reproduces the known optimal configurations (octahedron, cross-polytope,
  icosahedron) and gives a well-spread set otherwise.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def uniformity_loss(centres: torch.Tensor, tau: float, include_self: bool = True) -> torch.Tensor:
    """``mean_c log sum_{c'} exp(<psi_c, psi_c'> / tau)`` of L2-normalised ``centres [K, D]``; a 0-dim tensor.

    ``include_self=True`` keeps the diagonal term ``c' = c`` as in the ACTION++ code (its value for a K=4 simplex at
    ``tau = 0.07`` is ``log(e^{1/tau} + 3 e^{-1/(3 tau)}) = 14.285714``); ``include_self=False`` drops it, which is the
    form that gradient descent can actually minimise.

    Raises:
        ValueError: ``centres`` is not 2-D with at least one row (two without the self term), or ``tau <= 0``.
    """
    if centres.ndim != 2 or centres.shape[0] < (1 if include_self else 2):
        raise ValueError(f'centres must be [K, D] with K >= {1 if include_self else 2}, got {tuple(centres.shape)}')
    if not tau > 0:
        raise ValueError(f'tau must be > 0, got {tau}')
    psi = F.normalize(centres.float() if centres.dtype in (torch.float16, torch.bfloat16) else centres, dim=1)
    sim = psi @ psi.T / tau
    if not include_self:
        sim = sim.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device), float('-inf'))
    return torch.logsumexp(sim, dim=1).mean()


def _regular_simplex(num_classes: int, dim: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    k = num_classes
    # rows of the centring matrix I - 1/K are the vertices of a regular simplex in the (K-1)-dim subspace orthogonal
    # to the all-ones vector; express them in an orthonormal basis of that subspace, then embed that basis in R^D.
    centring = torch.eye(k, dtype=torch.float64) - 1.0 / k
    vertices = F.normalize(centring, dim=1)
    _, eigvecs = torch.linalg.eigh(centring)        # eigenvalues 0 (once, the ones direction), then 1 (K-1 times)
    coords = vertices @ eigvecs[:, 1:]             # [K, K-1]
    gaussian = torch.randn(dim, k - 1, generator=generator, dtype=torch.float64)
    basis, r = torch.linalg.qr(gaussian)           # [D, K-1], orthonormal columns
    signs = torch.diagonal(r).sign()
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)  # sign fix: Haar-distributed rotation
    return coords @ basis.T


def _optimised_centres(num_classes: int, dim: int, generator: Optional[torch.Generator], steps: int, lr: float,
                       tau: float) -> torch.Tensor:
    x = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: intra-op threads only add overhead (10x on a busy machine)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = uniformity_loss(x, tau, include_self=False)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
    finally:
        torch.set_num_threads(threads)
    return F.normalize(x.detach(), dim=1)


def uniform_centres(num_classes: int, dim: int, generator: Optional[torch.Generator] = None, *,
                    method: str = 'auto', steps: int = 1000, lr: float = 2e-2, tau: float = 0.25) -> torch.Tensor:
    """``num_classes`` unit vectors in ``R^dim``, spread as uniformly as possible: ``Tensor [K, D] float32`` (CPU).

    Args:
        num_classes: ``K >= 2`` (background included, as in ACTION++).
        dim: ``D >= 1``, the feature dimension of the contrastive space.
        generator: CPU ``torch.Generator`` for the random rotation / initialisation (``None``: global RNG). Seed it,
            and save the centres with the checkpoint.
        method: ``'auto'`` (simplex when ``K <= D + 1``, else optimised), ``'simplex'`` or ``'optimise'``.
        steps, lr, tau: Adam settings of the optimised mode (uniformity loss without the self term, float64,
            lr cosine-decayed to 0). Ignored by the simplex.

    Returns:
        ``psi [K, D]``. Simplex: every norm 1, every pairwise cosine ``-1/(K-1)``, ``psi.sum(0) = 0`` (to float32
        rounding). Optimised: a well-spread set (for ``K = 2D`` the cross-polytope, for ``K=12, D=3`` the icosahedron).

    Raises:
        ValueError: ``num_classes < 2``, ``dim < 1``, an unknown ``method``, ``method='simplex'`` with ``K > D + 1``,
            or non-positive ``steps``/``lr``/``tau``.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f'num_classes must be an integer >= 2, got {num_classes}')
    if int(dim) != dim or dim < 1:
        raise ValueError(f'dim must be an integer >= 1, got {dim}')
    if method not in ('auto', 'simplex', 'optimise'):
        raise ValueError(f"method must be 'auto', 'simplex' or 'optimise', got {method!r}")
    num_classes, dim = int(num_classes), int(dim)
    if method == 'simplex' and num_classes > dim + 1:
        raise ValueError(f'a regular simplex of {num_classes} vertices needs dim >= {num_classes - 1}, got dim={dim}')
    if generator is not None and generator.device.type != 'cpu':
        raise ValueError(f'generator must be a CPU generator, got one on {generator.device}')
    use_simplex = method == 'simplex' or (method == 'auto' and num_classes <= dim + 1)
    if use_simplex:
        return _regular_simplex(num_classes, dim, generator).float()
    if int(steps) != steps or steps < 1:
        raise ValueError(f'steps must be a positive integer, got {steps}')
    if not lr > 0:
        raise ValueError(f'lr must be > 0, got {lr}')
    if not tau > 0:
        raise ValueError(f'tau must be > 0, got {tau}')
    return _optimised_centres(num_classes, dim, generator, int(steps), float(lr), float(tau)).float()


def simplex_cosine(num_classes: int) -> float:
    """The pairwise cosine of a regular simplex with ``num_classes`` vertices, ``-1/(K-1)``."""
    if num_classes < 2:
        raise ValueError(f'num_classes must be >= 2, got {num_classes}')
    return -1.0 / (num_classes - 1)


__all__ = ['uniform_centres', 'uniformity_loss', 'simplex_cosine']
