"""Checks of image contents shared by the converters and the unlabelled-data path: one definition of "non-finite
intensities" and of an image's spatial dimensionality, so both refuse the same inputs with the same words."""
from typing import Optional, Sequence

import numpy as np

# nnU-Net's readers mark a 2-D image with one slice and a placeholder slice spacing far above the in-plane ones
# (999 for NaturalImage2DIO, 999 x the largest in-plane spacing for SimpleITKIO; BaseReaderWriter's convention).
# A ratio this large never occurs in a real single-slice 3-D scan (a 10 mm slab at 0.5 mm in-plane is 20).
_PLACEHOLDER_SPACING_RATIO = 100.0


def nonfinite_problem(pixels: np.ndarray, source: str) -> Optional[str]:
    """What is wrong with ``pixels`` (any shape) if it holds NaN or +-inf, else ``None``.

    ``source`` names the file(s) in the message. Integer images cannot hold either and are not scanned."""
    pixels = np.asarray(pixels)
    if not np.issubdtype(pixels.dtype, np.floating):
        return None
    finite = np.isfinite(pixels)
    if finite.all():
        return None
    n_nan = int(np.count_nonzero(np.isnan(pixels)))
    n_inf = int(pixels.size - np.count_nonzero(finite)) - n_nan
    return (f'{source}: the image contains NaN or infinite values ({n_nan} NaN, {n_inf} infinite voxel(s)); repair '
            f'the file (e.g. set them to the background intensity) or remove the case')


def spatial_dims(shape: Sequence[int], spacing: Sequence[float]) -> int:
    """2 or 3: the spatial dimensionality of an image as nnU-Net's readers return it, ``shape = [C, Z, Y, X]`` and
    ``spacing = [sz, sy, sx]``. A 2-D image read by them has ``Z == 1`` and a placeholder ``sz`` (see above)."""
    if len(shape) != 4 or len(spacing) != 3:
        raise ValueError(f'expected a reader\'s [C, Z, Y, X] image and [sz, sy, sx] spacing, got shape '
                         f'{tuple(shape)} and spacing {tuple(spacing)}')
    placeholder = float(spacing[0]) >= _PLACEHOLDER_SPACING_RATIO * max(float(s) for s in spacing[1:])
    return 2 if shape[1] == 1 and placeholder else 3
