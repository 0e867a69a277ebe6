"""Strong-view mixing for the unlabelled batch: CutMix as MONA / ARCO (and ReCo before them) use it."""
import math
from typing import Optional, Sequence, Tuple

import torch


def cutmix_box_mask(batch_size: int, spatial_shape: Sequence[int], generator: Optional[torch.Generator] = None,
                    area_fraction: float = 0.5, full_extent_axes: Sequence[int] = (),
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """One random axis-aligned box per sample, as a ``[B, *spatial]`` bool mask (True inside the box).

    The box covers about ``area_fraction`` of the patch (area in 2D, volume in 3D). Its side fractions ``f_k``
    (of each spatial axis) have a random aspect ratio: ``f_k = area_fraction ** w_k`` with ``w`` uniform on the
    simplex, so ``prod f_k = area_fraction`` and every ``f_k`` lies in ``[area_fraction, 1]``. Axes listed in
    ``full_extent_axes`` (spatial axis indices, e.g. ``(0,)`` for all slices of a ``[z, y, x]`` nnU-Net patch) are
    spanned completely and the fraction is spread over the others. Sides are rounded to whole pixels (at
    least 1), positions are uniform within the patch. Built by broadcasting coordinate comparisons.
    """
    nd = len(spatial_shape)
    if not 0.0 < area_fraction <= 1.0:
        raise ValueError(f'area_fraction must be in (0, 1], got {area_fraction}')
    full = sorted({int(a) % nd for a in full_extent_axes}) if nd else []
    if any(not -nd <= int(a) < nd for a in full_extent_axes) or len(full) == nd:
        raise ValueError(f'full_extent_axes must name some but not all of the {nd} spatial axes, '
                         f'got {tuple(full_extent_axes)}')
    gdev = generator.device if generator is not None else (device or torch.device('cpu'))
    device = device if device is not None else gdev
    free = [k for k in range(nd) if k not in full]
    u = torch.rand(batch_size, len(free) + nd, generator=generator, device=gdev, dtype=torch.float64).to(device)
    w = -torch.log(u[:, :len(free)].clamp_min(1e-12))  # exponential -> normalised = uniform on the simplex
    w = w / w.sum(1, keepdim=True)
    sizes = torch.tensor([float(s) for s in spatial_shape], dtype=torch.float64, device=device)
    frac = torch.ones(batch_size, nd, dtype=torch.float64, device=device)
    frac[:, free] = torch.exp(w * math.log(area_fraction))
    side = torch.clamp(torch.round(frac * sizes), min=1)
    side = torch.minimum(side, sizes)
    start = torch.floor(u[:, len(free):] * (sizes - side + 1)).clamp(max=sizes - side)  # uniform over positions
    mask = torch.ones(batch_size, *spatial_shape, dtype=torch.bool, device=device)
    for k, s in enumerate(spatial_shape):
        coord = torch.arange(s, device=device, dtype=torch.float64).view([1] * (1 + k) + [s] + [1] * (nd - k - 1))
        lo, hi = start[:, k].view(-1, *[1] * nd), (start[:, k] + side[:, k]).view(-1, *[1] * nd)
        mask &= (coord >= lo) & (coord < hi)
    return mask


def cutmix(images: torch.Tensor, *maps: torch.Tensor, generator: Optional[torch.Generator] = None,
           area_fraction: float = 0.5, full_extent_axes: Sequence[int] = ()) -> Tuple[torch.Tensor, ...]:
    """CutMix of a batch with itself: sample ``i`` receives a box cut from sample ``(i + 1) % B``.

    The same box mask is applied to the image and to every per-pixel map (pseudo-labels, confidences,
    probabilities), so they stay aligned. With ``B = 1`` nothing changes. Defaults follow the MONA/ARCO code in
    2D (one box of about half the area per sample). In 3D the released code used half the in-plane area x 10 of
    80 slices (1/16 of the volume); we default to a box of half the *volume* over all three axes (the
    natural generalisation), and ``full_extent_axes=(0,)`` gives the "half the in-plane area x all slices"
    variant. See :func:`cutmix_box_mask`.

    Args:
        images: ``[B, C, *sp]``.
        *maps: tensors ``[B, *sp]`` or ``[B, K, *sp]`` of any dtype (same ``B`` and ``*sp``).
        generator: ``torch.Generator`` for the boxes (deterministic under a seed).
        area_fraction: box size as a fraction of the patch (0.5).
        full_extent_axes: spatial axes the box spans completely (default none).

    Returns:
        ``(mixed_images, *mixed_maps, box_mask)``; mixed tensors keep shape and dtype, ``box_mask`` is
        ``[B, *sp]`` bool, True where the content came from the partner ``(i + 1) % B``.
    """
    if images.ndim < 3:
        raise ValueError(f'images must be [B, C, *spatial], got {tuple(images.shape)}')
    b, sp = images.shape[0], tuple(images.shape[2:])
    for i, m in enumerate(maps):
        if m.shape[0] != b or tuple(m.shape[-len(sp):]) != sp or m.ndim not in (len(sp) + 1, len(sp) + 2):
            raise ValueError(f'map {i} must be [B={b}, (K,) *{sp}], got {tuple(m.shape)}')
    box = cutmix_box_mask(b, sp, generator, area_fraction, full_extent_axes, device=images.device)

    def mix(x):
        sel = box if x.ndim == len(sp) + 1 else box.unsqueeze(1)
        return torch.where(sel, x.roll(-1, dims=0), x)  # roll(-1): row i holds sample (i + 1) % B

    return (mix(images),) + tuple(mix(m) for m in maps) + (box,)
