"""Anchor samplers for pixel/voxel contrastive losses: naive (NS), stratified group (SG) and
stratified-antithetic group (SAG), after ARCO (You et al., "Rethinking semi-supervised medical image
segmentation: a variance-reduction perspective", NeurIPS 2023).

A contrastive loss over a class's candidate positions ``P`` is a mean ``H = (1/|P|) sum_p h(p)`` (``h`` =
per-anchor loss); it is estimated from ``n`` sampled anchors. ARCO's samplers reduce the variance of that
estimate:

* **NS**: ``n`` i.i.d. uniform draws from ``P``. ``Var_NS = sigma^2 / n``.
* **SG**: ``P`` is split into strata ``P_m`` (here: the cells of a spatial grid, per image, intersected with
  the candidate mask); stratum ``m`` gets ``n_m`` i.i.d. uniform draws. With ``W_m = |P_m| / |P|`` and
  proportional allocation ``n_m = n W_m``: ``Var_SG = (1/n) sum_m W_m sigma_m^2`` and, by the law of total
  variance, ``Var_NS - Var_SG = (1/n) sum_m W_m (mu_m - mu)^2 >= 0`` (spec §4.2; the paper's Theorem 3.2
  drops the ``W_m``, which makes the gap 16x too large on a 4x4 grid).
* **SAG**: as SG, but stratum ``m`` gets ``n_m / 2`` uniform base draws plus, for each, its antithetic partner
  ``tau_m(p)`` in the same stratum. Here ``tau_m`` is **rank reflection**: the stratum's candidates in raster
  order, rank ``k`` paired with rank ``N_m - 1 - k``. It is a measure-preserving involution (so every draw,
  partner or not, is marginally uniform on ``P_m``), it always lands on a candidate (a spatial reflection can
  leave a class mask) and on a full rectangular cell it *is* the point reflection through the cell centre,
  the paper's ``p' = 2 c_m - p``. With ``C_m = Cov_{p ~ U(P_m)}[h(p), h(tau_m p)]`` in ``[-sigma_m^2,
  sigma_m^2]``, ``p_m`` pairs and ``s_m`` unpaired draws (``n_m = 2 p_m + s_m``), the estimator here has
  exactly

      Var_SAG = sum_m (W_m / n_m)^2 [2 p_m (sigma_m^2 + C_m) + s_m sigma_m^2],

  which for even, exactly proportional ``n_m`` is ``Var_SG + (1/n) sum_m W_m C_m <= 2 Var_SG`` (per stratum:
  ``W_m (sigma_m^2 + C_m) / n <= 2 W_m sigma_m^2 / n``). SAG beats SG when partners are negatively
  correlated, i.e. when ``h`` is roughly monotone inside a cell.

**Allocation and weights.** Exact proportionality ``n_m = n W_m`` is rarely an integer, and the samplers must
stay unbiased for any mask. Counts are therefore allocated by largest remainder (Hamilton), every non-empty
stratum getting at least one draw, and each draw carries the weight ``w_m = W_m n / n_m``, so that
``(1/n) sum_i w_i h(p_i) = sum_m W_m hbar_m`` is **exactly unbiased** for ``H`` (all weights are 1 when the
allocation is exactly proportional). With fewer draws than non-empty strata no such allocation exists and
SG/SAG fall back to NS. SAG allocates *pairs* proportionally (``n // 2`` of them, so ``n_m`` is even) and
puts an odd leftover draw, unpaired, into the most under-served stratum; only when ``n // 2`` is smaller than
the number of non-empty strata does it allocate ``n_m`` directly and leave odd ``n_m`` with one unpaired draw.

**What the authors' code does instead** (spec §4.3). The released ``grid_monte_carlo_sample`` /
``grid_as_monte_carlo_sample`` reshape the 1-D list of candidate indices into a ``round(sqrt(N))``-square
pseudo-image and cut *that* into 4x4 cells, so the strata are bands of the raster-ordered list, not a spatial
grid; every cell gets the same count although cells differ in size, indices beyond ``edge^2`` are reachable
only through uniform padding, and no weights are applied. The samplers are thus not proportional and the
estimate is biased (inclusion probabilities differ by up to 20x, or are zero, depending on ``N``). This module
follows the paper's intent instead: a spatial grid per image, proportional allocation, and weights.

**Conventions** (the contract of design §6):

* ``mask``: bool ``[B, *spatial]``; candidates are numbered in ``mask.nonzero()`` (raster) order, so
  ``h[mask][indices]`` are the sampled values of any per-position ``h`` of the same shape.
* Grid axis order follows the spatial axes. Defaults: ``(4, 4)`` in 2D and ``(2, 4, 4)`` for nnU-Net's 3D
  ``[D, H, W]`` patches, i.e. 4x4 in plane and 2 through plane (the first spatial axis is the often coarse
  through-plane axis). Cell of coordinate ``x`` along an axis of size ``s`` with ``G`` cells:
  ``floor(x G / s)`` (cells differ in size by at most one voxel; an axis shorter than ``G`` leaves cells
  empty, which is harmless).
* Strata are (image, cell) pairs; stratum id ``b * prod(grid) + cell`` with cells numbered row-major.
* Empty mask: ``indices`` and ``weights`` are empty (shape ``[0]``); the calling loss skips the class.
* Randomness: every draw comes from ``generator``. The ``n`` uniform numbers are drawn on the generator's
  device (any device; a CPU generator is fine for CUDA masks) and then moved to the mask's device, so a
  seeded CPU generator gives the same indices for a CPU and a CUDA mask. Without a generator the global RNG
  of the mask's device is used. Needs float64 on the drawing device (CPU, CUDA).
* ``replicates=R`` (keyword) returns ``[R, n]`` indices and weights: ``R`` independent samples of size
  ``n`` in one vectorised call (Monte-Carlo tests, benchmarks); ``replicates=None`` returns ``[n]``.
"""
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

MODES = ('naive', 'sg', 'sag')
DEFAULT_GRID_2D = (4, 4)
DEFAULT_GRID_3D = (2, 4, 4)  # [D, H, W]: 2 through plane, 4x4 in plane

GridLike = Union[int, Sequence[int], None]


class Strata(NamedTuple):
    """Candidates grouped by stratum.

    order:   ``[N] long``, candidate indices (``mask.nonzero()`` order) sorted by stratum, raster order inside
             a stratum; ``order[offsets[m] + k]`` is the candidate of rank ``k`` in stratum ``m``.
    counts:  ``[S] long``, ``N_m`` per stratum (``S = B * prod(grid)``; zero for empty strata).
    offsets: ``[S] long``, start of each stratum in ``order`` (exclusive cumulative sum of ``counts``).
    """
    order: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_candidates(self) -> int:
        return self.order.numel()


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f'mask must be a bool torch.Tensor [B, *spatial], got {type(mask).__name__}')
    if mask.dtype != torch.bool:
        raise ValueError(f'mask must have dtype torch.bool, got {mask.dtype}')
    if mask.ndim < 2:
        raise ValueError(f'mask must be [B, *spatial] with at least one spatial axis, got shape '
                         f'{tuple(mask.shape)}')


def _check_n(n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f'n must be an integer, got {n!r}') from None
    if n <= 0:
        raise ValueError(f'n must be > 0, got {n}')
    return n


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    return mode


def _check_replicates(replicates) -> Optional[int]:
    if replicates is None:
        return None
    try:
        replicates = operator.index(replicates)
    except TypeError:
        raise ValueError(f'replicates must be None or an integer >= 1, got {replicates!r}') from None
    if replicates < 1:
        raise ValueError(f'replicates must be None or an integer >= 1, got {replicates}')
    return replicates


def default_grid(num_spatial_dims: int) -> Tuple[int, ...]:
    """``(4, 4)`` for 2D, ``(2, 4, 4)`` for 3D ``[D, H, W]``; other dimensionalities need an explicit grid."""
    if num_spatial_dims == 2:
        return DEFAULT_GRID_2D
    if num_spatial_dims == 3:
        return DEFAULT_GRID_3D
    raise ValueError(f'no default grid for {num_spatial_dims} spatial dimensions; pass grid explicitly')


def resolve_grid(spatial_shape: Sequence[int], grid: GridLike = None) -> Tuple[int, ...]:
    """Per-axis cell counts for ``spatial_shape``: the default (``grid=None``), one int for every axis, or a
    sequence with one positive int per spatial axis."""
    d = len(spatial_shape)
    if grid is None:
        return default_grid(d)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,) * d
    try:
        grid = tuple(operator.index(g) for g in grid)
    except TypeError:
        raise ValueError(f'grid must be None, an int or a sequence of ints, got {grid!r}') from None
    if len(grid) != d:
        raise ValueError(f'grid {grid} has {len(grid)} entries but the mask has {d} spatial axes '
                         f'{tuple(spatial_shape)}')
    if any(g < 1 for g in grid):
        raise ValueError(f'grid cell counts must be >= 1, got {grid}')
    return grid


# ----------------------------------------------------------------------------------------------------------
# strata
# ----------------------------------------------------------------------------------------------------------
def stratum_ids(mask: torch.Tensor, grid: GridLike = None) -> Tuple[torch.Tensor, int]:
    """Stratum of every candidate.

    Args:
        mask: bool ``[B, *spatial]``.
        grid: per-axis cell counts (see ``resolve_grid``).
    Returns:
        ``(ids, S)``: ``ids [N] long`` in ``mask.nonzero()`` order, ``ids = b * prod(grid) + cell`` with the
        cell numbered row-major over the grid; ``S = B * prod(grid)``.
    """
    _check_mask(mask)
    B, *spatial = mask.shape
    grid = resolve_grid(spatial, grid)
    d = len(spatial)
    cell = torch.zeros((1,) * (d + 1), dtype=torch.long, device=mask.device)
    stride = 1
    for axis in reversed(range(d)):  # <= 3 axes
        size, g = spatial[axis], grid[axis]
        c = torch.arange(size, device=mask.device) * g // size
        shape = [1] * (d + 1)
        shape[axis + 1] = size
        cell = cell + c.view(shape) * stride
        stride *= g
    image = torch.arange(B, device=mask.device).view([B] + [1] * d) * stride
    return (cell + image)[mask], B * stride


def _cell_slots(size: int, g: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of the ``g`` cells of an axis of ``size`` as a padded ``[g, w]`` table (``w`` = widest
    cell) plus a ``[g, w]`` validity table; padding slots repeat a valid coordinate and are masked out."""
    cells = torch.arange(g + 1, device=device)
    bounds = (cells * size + g - 1) // g  # cell c = [ceil(c s / g), ceil((c + 1) s / g)) = {x: x g // s == c}
    starts, widths = bounds[:-1], bounds[1:] - bounds[:-1]
    w = -(-size // g)
    j = torch.arange(w, device=device)
    valid = j < widths[:, None]
    coords = (starts[:, None] + j).clamp_max(size - 1)
    return coords, valid


def stratify(mask: torch.Tensor, grid: GridLike = None) -> Strata:
    """Group the candidates of ``mask`` by (image, grid cell), raster order inside each stratum.

    Equivalent to a stable sort of ``stratum_ids(mask, grid)`` but done without sorting: the mask is gathered
    into a ``[B, cells..., within-cell...]`` layout (cells padded to the widest one), where reading the
    candidates in memory order lists them stratum by stratum, each in raster order.

    Args:
        mask: bool ``[B, *spatial]``.
        grid: per-axis cell counts (see ``resolve_grid``).
    Returns:
        ``Strata(order [N], counts [S], offsets [S])``, all long on ``mask.device``.
    """
    _check_mask(mask)
    B, *spatial = mask.shape
    grid = resolve_grid(spatial, grid)
    d = len(spatial)
    num_strata = B
    for g in grid:
        num_strata *= g
    # candidate number at every position (meaningful where mask is True); int32 halves the memory traffic
    rank_dtype = torch.int32 if mask.numel() < 2 ** 31 else torch.long
    rank = (torch.cumsum(mask.reshape(-1), 0, dtype=rank_dtype) - 1).view(mask.shape)
    # [B, g1, w1, g2, w2, ...] -> [B, g1, g2, ..., w1, w2, ...]
    perm = [0] + [1 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)]
    if all(size % g == 0 for size, g in zip(spatial, grid)):  # equal cells: a view, no gather
        blocked = [B] + [x for size, g in zip(spatial, grid) for x in (g, size // g)]
        grouped_mask = mask.view(blocked).permute(perm).reshape(num_strata, -1)
        grouped_rank = rank.view(blocked).permute(perm).reshape(num_strata, -1)
    else:  # unequal cells: gather into a layout padded to the widest cell, padding masked out
        index, slot_valid = [], None
        for axis, (size, g) in enumerate(zip(spatial, grid)):  # <= 3 axes
            coords, valid = _cell_slots(size, g, mask.device)
            shape = [1] * (2 * d)
            shape[2 * axis], shape[2 * axis + 1] = coords.shape
            index.append(coords.view(shape))
            slot_valid = valid.view(shape) if slot_valid is None else slot_valid & valid.view(shape)
        index = (slice(None),) + tuple(index)
        grouped_mask = (mask[index] & slot_valid).permute(perm).reshape(num_strata, -1)
        grouped_rank = rank[index].permute(perm).reshape(num_strata, -1)
    order = grouped_rank[grouped_mask].to(torch.long)
    counts = grouped_mask.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    return Strata(order, counts, offsets)


# ----------------------------------------------------------------------------------------------------------
# allocation
# ----------------------------------------------------------------------------------------------------------
def allocate_proportional(counts: torch.Tensor, n: int) -> torch.Tensor:
    """Split ``n`` draws over strata of sizes ``counts``, proportionally to size, every non-empty stratum
    getting at least one.

    Strata whose share ``n N_m / N`` would be below one draw get exactly one. They are the ``k`` smallest
    strata for the first ``k`` at which the next-smallest stratum's share of the remaining ``n - k`` draws
    reaches one, found in one vectorised pass over the sorted counts; the other strata share the remaining
    draws by largest remainder (Hamilton's method, ties to the lower stratum id). Without strata below one
    draw this is plain largest remainder, so ``|n_m - n W_m| < 1``.

    Args:
        counts: ``[S]`` integer stratum sizes ``N_m >= 0``.
        n: number of draws, ``>=`` the number of non-empty strata.
    Returns:
        ``[S] long`` allocation summing to ``n``; zero exactly for empty strata.
    Raises:
        ValueError: ``n`` below the number of non-empty strata, or no candidates at all.
    """
    n = _check_n(n)
    counts = counts.to(torch.long)
    S = counts.numel()
    nonempty = int((counts > 0).sum())
    if nonempty == 0:
        raise ValueError('allocate_proportional: all strata are empty')
    if n < nonempty:
        raise ValueError(f'allocate_proportional: n={n} draws cannot cover {nonempty} non-empty strata')
    dev = counts.device
    total = counts.sum()
    sort_idx = torch.argsort(counts, stable=True)  # empty strata first
    sc = counts[sort_idx]
    pos = torch.arange(S, device=dev)
    first_nonempty = S - nonempty
    fixed_before = pos - first_nonempty  # number of smaller non-empty strata fixed at one draw
    excl = torch.cumsum(sc, 0) - sc
    share_ok = (pos >= first_nonempty) & ((n - fixed_before) * sc >= total - excl)
    j_star = torch.argmax(share_ok.to(torch.int8))  # first True; exists since n >= nonempty
    fixed = (pos >= first_nonempty) & (pos < j_star)
    rest = pos >= j_star
    n_rest = n - (j_star - first_nonempty)
    total_rest = total - excl[j_star]
    quota = n_rest * sc
    floor_sorted = torch.where(rest, quota // total_rest, 0) + fixed.to(torch.long)
    rem_sorted = torch.where(rest, quota % total_rest, -1)
    alloc = torch.empty_like(counts).scatter_(0, sort_idx, floor_sorted)
    remainder = torch.empty_like(counts).scatter_(0, sort_idx, rem_sorted)
    surplus = n - alloc.sum()
    by_remainder = torch.argsort(remainder, descending=True, stable=True)
    bonus = (torch.arange(S, device=dev) < surplus).to(torch.long)
    alloc.scatter_add_(0, by_remainder, bonus)
    return alloc


def allocate_antithetic(counts: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split ``n`` draws into antithetic pairs and unpaired draws per stratum.

    If ``n // 2 >=`` the number of non-empty strata, the ``n // 2`` pairs are allocated proportionally
    (``allocate_proportional``) and, for odd ``n``, the one leftover draw goes unpaired to the stratum most
    under-served by the pairs (largest ``n N_m / N - 2 p_m``, lowest id on ties). Otherwise ``n_m`` is
    allocated directly and split into ``n_m // 2`` pairs and ``n_m % 2`` unpaired draws.

    Args:
        counts: ``[S]`` integer stratum sizes.
        n: number of draws, ``>=`` the number of non-empty strata.
    Returns:
        ``(pairs [S] long, singles [S] long)`` with ``2 pairs.sum() + singles.sum() == n``.
    Raises:
        ValueError: as ``allocate_proportional``.
    """
    n = _check_n(n)
    counts = counts.to(torch.long)
    nonempty = int((counts > 0).sum())
    if nonempty and n // 2 >= nonempty:
        pairs = allocate_proportional(counts, n // 2)
        singles = torch.zeros_like(pairs)
        if n % 2:
            deficit = n * counts - 2 * pairs * counts.sum()  # N * (n W_m - 2 p_m); sums to N > 0
            singles[torch.argmax(deficit)] = 1
        return pairs, singles
    total = allocate_proportional(counts, n)
    return total // 2, total % 2


def stratum_weights(counts: torch.Tensor, alloc: torch.Tensor, n: int) -> torch.Tensor:
    """``w_m = W_m n / n_m = N_m n / (N n_m)`` as ``[S] float64`` (0 where ``n_m = 0``); computed from
    integers so that an exactly proportional allocation gives weights of exactly 1."""
    num = (counts.to(torch.long) * n).to(torch.float64)
    den = (counts.sum() * alloc.to(torch.long)).to(torch.float64)
    return torch.where(alloc > 0, num / den.clamp_min(1), torch.zeros_like(num))


# ----------------------------------------------------------------------------------------------------------
# draws
# ----------------------------------------------------------------------------------------------------------
def _uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Float64 uniforms in [0, 1) drawn on the generator's device (the mask's without one), moved to
    ``device``."""
    draw_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float64)
    return u.to(device)


def _uniform_rank(u: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``floor(u * size)`` as long, clamped below ``size`` (float64 rounding can reach ``size``)."""
    return torch.minimum((u * size).to(torch.long), size - 1)


def _sample_shape(n: int, replicates: Optional[int]) -> Tuple[int, ...]:
    return (n,) if replicates is None else (replicates, n)


def _empty(device, replicates: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = _sample_shape(0, replicates)
    return (torch.empty(shape, dtype=torch.long, device=device),
            torch.empty(shape, dtype=torch.float32, device=device))


def sample_naive(num_candidates: int, n: int, generator: Optional[torch.Generator] = None,
                 device: Union[torch.device, str, None] = None,
                 replicates: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` i.i.d. uniform draws (with replacement) from ``range(num_candidates)``.

    Returns:
        ``(indices [n] long, weights [n] float32 = 1)`` on ``device`` (``[R, n]`` with ``replicates=R``);
        empty if ``num_candidates == 0``.
    """
    n = _check_n(n)
    replicates = _check_replicates(replicates)
    device = torch.device(device) if device is not None else torch.device('cpu')
    num_candidates = int(num_candidates)
    if num_candidates < 0:
        raise ValueError(f'num_candidates must be >= 0, got {num_candidates}')
    if num_candidates == 0:
        return _empty(device, replicates)
    shape = _sample_shape(n, replicates)
    size = torch.tensor(num_candidates, dtype=torch.long, device=device)
    indices = _uniform_rank(_uniform(shape, generator, device), size)
    return indices, torch.ones(shape, dtype=torch.float32, device=device)


def sample_stratified(strata: Strata, n: int, generator: Optional[torch.Generator] = None,
                      replicates: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """SG: proportional allocation (``allocate_proportional``), uniform draws with replacement inside each
    stratum, weights ``W_m n / n_m``; NS if ``n`` is below the number of non-empty strata.

    Returns:
        ``(indices [n] long, weights [n] float32)`` (``[R, n]`` with ``replicates=R``), grouped by stratum in
        stratum-id order; empty if there are no candidates.
    """
    n = _check_n(n)
    replicates = _check_replicates(replicates)
    counts = strata.counts
    dev = counts.device
    N = strata.num_candidates
    if N == 0:
        return _empty(dev, replicates)
    if n < int((counts > 0).sum()):
        return sample_naive(N, n, generator, dev, replicates)
    alloc = allocate_proportional(counts, n)
    draw_stratum = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), alloc, output_size=n)
    shape = _sample_shape(n, replicates)
    ranks = _uniform_rank(_uniform(shape, generator, dev), counts[draw_stratum])
    indices = strata.order[strata.offsets[draw_stratum] + ranks]
    weights = stratum_weights(counts, alloc, n)[draw_stratum].to(torch.float32).expand(shape).contiguous()
    return indices, weights


def sample_stratified_antithetic(strata: Strata, n: int, generator: Optional[torch.Generator] = None,
                                 replicates: Optional[int] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """SAG: pairs allocated by ``allocate_antithetic``; each pair is a uniform base draw of rank ``k`` in its
    stratum and its rank reflection ``N_m - 1 - k``; unpaired draws are uniform. Weights ``W_m n / n_m`` with
    ``n_m = 2 p_m + s_m``. NS if ``n`` is below the number of non-empty strata.

    Returns:
        ``(indices, weights, num_pairs)``: ``indices [n] long`` and ``weights [n] float32`` (``[R, n]`` with
        ``replicates=R``) laid out as ``[base draws (P), their partners (P, same order), unpaired (n - 2P)]``,
        so ``indices[..., i]`` and ``indices[..., P + i]`` are a pair for ``i < P = num_pairs``. Empty and
        ``num_pairs = 0`` if there are no candidates; ``num_pairs = 0`` under the NS fallback.
    """
    n = _check_n(n)
    replicates = _check_replicates(replicates)
    counts = strata.counts
    dev = counts.device
    N = strata.num_candidates
    if N == 0:
        return (*_empty(dev, replicates), 0)
    if n < int((counts > 0).sum()):
        return (*sample_naive(N, n, generator, dev, replicates), 0)
    pairs, singles = allocate_antithetic(counts, n)
    num_pairs = int(pairs.sum())
    num_singles = n - 2 * num_pairs
    ids = torch.arange(counts.numel(), device=dev)
    pair_stratum = torch.repeat_interleave(ids, pairs, output_size=num_pairs)
    single_stratum = torch.repeat_interleave(ids, singles, output_size=num_singles)
    drawn_stratum = torch.cat([pair_stratum, single_stratum])
    ranks = _uniform_rank(_uniform(_sample_shape(num_pairs + num_singles, replicates), generator, dev),
                          counts[drawn_stratum])
    base, single = ranks[..., :num_pairs], ranks[..., num_pairs:]
    partner = counts[pair_stratum] - 1 - base
    all_stratum = torch.cat([pair_stratum, pair_stratum, single_stratum])
    indices = strata.order[strata.offsets[all_stratum] + torch.cat([base, partner, single], dim=-1)]
    weights = stratum_weights(counts, 2 * pairs + singles, n)[all_stratum].to(torch.float32)
    return indices, weights.expand(indices.shape).contiguous(), num_pairs


def sample(mask: torch.Tensor, n: int, mode: str, grid: GridLike = None,
           generator: Optional[torch.Generator] = None, *,
           replicates: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` anchors from the candidates of ``mask`` (design §6 contract).

    Args:
        mask: bool ``[B, *spatial]`` (2D ``[B, H, W]``, 3D ``[B, D, H, W]``), the candidate positions.
        n: number of draws (> 0).
        mode: ``'naive'`` (NS), ``'sg'`` (stratified) or ``'sag'`` (stratified antithetic).
        grid: per-axis cell counts for SG/SAG; default ``(4, 4)`` in 2D, ``(2, 4, 4)`` in 3D ``[D, H, W]``.
        generator: source of every random draw; may live on another device than ``mask`` (see module doc).
        replicates: ``R`` independent samples at once (``[R, n]`` outputs) instead of one.
    Returns:
        ``(indices, weights)``: ``indices [n] long`` into the candidates in ``mask.nonzero()`` order, so that
        ``h[mask][indices]`` are the sampled values, and ``weights [n] float32`` with
        ``(weights * h[mask][indices]).sum() / n`` an unbiased estimate of ``h[mask].mean()``; both on
        ``mask.device``. Empty (shape ``[0]``) if ``mask`` has no candidate. SAG's layout is that of
        ``sample_stratified_antithetic``.
    Raises:
        ValueError: non-bool or non-tensor ``mask``, ``n <= 0``, unknown ``mode``, malformed ``grid``.
    """
    _check_mask(mask)
    n = _check_n(n)
    mode = _check_mode(mode)
    replicates = _check_replicates(replicates)
    if mode != 'naive' or grid is not None:  # NS ignores the grid but a malformed one is still an error
        grid = resolve_grid(mask.shape[1:], grid)
    if mode == 'naive':
        return sample_naive(int(mask.sum()), n, generator, mask.device, replicates)
    strata = stratify(mask, grid)
    if mode == 'sg':
        return sample_stratified(strata, n, generator, replicates)
    indices, weights, _ = sample_stratified_antithetic(strata, n, generator, replicates)
    return indices, weights


# ----------------------------------------------------------------------------------------------------------
# exact variance
# ----------------------------------------------------------------------------------------------------------
def analytic_variance(h: torch.Tensor, mask: torch.Tensor, n: int, mode: str, grid: GridLike = None) -> float:
    """Exact variance of the weighted estimator ``(1/n) sum_i w_i h(p_i)`` of ``h[mask].mean()`` under
    ``sample(mask, n, mode, grid)``, for a fixed per-position map ``h``, with the allocation and fallbacks the
    sampler uses:

    * NS: ``sigma^2 / n``;
    * SG: ``sum_m W_m^2 sigma_m^2 / n_m`` (``= (1/n) sum_m W_m sigma_m^2`` when exactly proportional);
    * SAG: ``sum_m (W_m / n_m)^2 [2 p_m (sigma_m^2 + C_m) + s_m sigma_m^2]`` with the rank-reflection
      covariance ``C_m`` (``= (1/n) sum_m W_m (sigma_m^2 + C_m)`` when exactly proportional with even
      ``n_m``).

    Variances are population variances over the candidates (divisor ``N_m``).

    Args:
        h: ``mask.shape`` (scalar field) or ``mask.shape + (D,)`` (vector field: the trace of the
            covariance is returned, as for a gradient).
        mask, n, mode, grid: as ``sample``.
    Returns:
        the variance as a Python float (computed in float64).
    Raises:
        ValueError: as ``sample``, a shape mismatch, or an empty mask.
    """
    _check_mask(mask)
    n = _check_n(n)
    mode = _check_mode(mode)
    grid = resolve_grid(mask.shape[1:], grid)
    if tuple(h.shape[:mask.ndim]) != tuple(mask.shape) or h.ndim > mask.ndim + 1:
        raise ValueError(f'h must have shape {tuple(mask.shape)} or {tuple(mask.shape)} + (D,), got '
                         f'{tuple(h.shape)}')
    N = int(mask.sum())
    if N == 0:
        raise ValueError('analytic_variance: mask has no candidate')
    values = h.to(device=mask.device, dtype=torch.float64)[mask].reshape(N, -1)  # [N, D]
    strata = stratify(mask, grid)
    counts = strata.counts
    if mode == 'naive' or n < int((counts > 0).sum()):
        return float(((values - values.mean(0)) ** 2).sum(1).mean() / n)
    S = counts.numel()
    sid = torch.repeat_interleave(torch.arange(S, device=mask.device), counts, output_size=N)
    hs = values[strata.order]
    size = counts.to(torch.float64).clamp_min(1)
    mu = torch.zeros(S, hs.shape[1], dtype=torch.float64, device=mask.device).index_add_(0, sid, hs) / size[:, None]
    dev = hs - mu[sid]
    var_m = torch.zeros(S, dtype=torch.float64, device=mask.device).index_add_(0, sid, (dev ** 2).sum(1)) / size
    W = counts.to(torch.float64) / N
    if mode == 'sg':
        alloc = allocate_proportional(counts, n).to(torch.float64)
        terms = W ** 2 * var_m / alloc.clamp_min(1)
        return float(terms.sum())
    # sag: partner of sorted position j in stratum m is offsets[m] + counts[m] - 1 - (j - offsets[m])
    j = torch.arange(N, device=mask.device)
    partner = 2 * strata.offsets[sid] + counts[sid] - 1 - j
    cov_m = torch.zeros(S, dtype=torch.float64, device=mask.device).index_add_(
        0, sid, (dev * dev[partner]).sum(1)) / size
    pairs, singles = allocate_antithetic(counts, n)
    pairs, singles = pairs.to(torch.float64), singles.to(torch.float64)
    n_m = (2 * pairs + singles).clamp_min(1)
    terms = (W / n_m) ** 2 * (2 * pairs * (var_m + cov_m) + singles * var_m)
    return float(terms.sum())
