"""Projection heads over tapped nnU-Net decoder features (MONA / ARCO, spec ``arco_mona.md`` §2).

* :class:`FPNProjectionHead` (``F_q`` / ``F_k``): fuses the tapped feature maps coarse to fine into one
  representation map ``[B, D, *spatial_out]`` at a chosen (reduced) decoder resolution.
* :class:`Predictor` (``P_q``): student-only pair of bias-free pointwise layers on top of ``F_q``, the
  BYOL-style asymmetry of the papers (the teacher branch uses ``F_k`` directly).
* :class:`EmbeddingHead`: global average pool -> Linear -> Linear, one vector per image (MONA pre-training
  global relational loss, and a learnt embedding for ``L_nn`` if wanted).

The heads take ``conv_op`` (``nn.Conv2d`` / ``nn.Conv3d``) as an argument, as dynamic-network-architectures
does, so one class serves 2D and 3D. Teacher heads are EMA copies of the student heads (``copy.deepcopy``
followed by the EMA update the trainer applies to the network); the heads themselves hold no teacher logic.
Outputs are *not* L2-normalised: the losses normalise.
"""
from typing import Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn

# Spec §2.6 recommendation, keyed by the number of spatial dimensions: representation width, and which
# tapped level the FPN head outputs at (index into the coarse->fine list; with nnU-Net's stride-2 stages,
# -2 is 1/2 of the finest tapped map and -3 is 1/4).
DEFAULT_REP_DIM = {2: 128, 3: 64}
DEFAULT_OUTPUT_LEVEL = {2: -2, 3: -3}

# F.interpolate's linear mode for a tensor of ``ndim`` dimensions ([B, C, *spatial]).
_LINEAR_MODE = {3: 'linear', 4: 'bilinear', 5: 'trilinear'}


def _pointwise(conv_op: Type[nn.Module], in_channels: int, out_channels: int) -> nn.Module:
    """A bias-free 1x1 (x1) convolution, or a bias-free ``nn.Linear`` when ``conv_op`` is ``nn.Linear``."""
    if issubclass(conv_op, nn.Linear):
        return nn.Linear(in_channels, out_channels, bias=False)
    return conv_op(in_channels, out_channels, kernel_size=1, bias=False)


class FPNProjectionHead(nn.Module):
    """FPN-like fusion of decoder features into a dense representation map (MONA/ARCO ``F_q``; spec §2.2).

    For levels ``f_0 .. f_{L-1}`` (coarse to fine)::

        x = conv(f_0) + f_0
        for l = 1 .. L-1:
            x = cat(resize(x), resize(f_l))        # to the working size of level l (see below)
            x = conv(x) + x                         # residual, width = running sum of channels
        out = conv_out(x)                           # -> out_dim, no residual

    All convolutions are bias-free 1x1 convs with no normalisation; with ``nonlinear=True`` a ``nonlin`` follows
    each residual conv (the papers call the head non-linear, the released code is linear: default linear).
    The papers run this at full input resolution; here the working size stops at ``output_level``: levels
    coarser than the output level are upsampled ((bi/tri)linear, chosen from the tensor's rank), levels finer
    than it are average-pooled down to it (``mode='area'``), which keeps their information at a fraction of
    the memory (spec §2.6: 1/2 resolution in 2D, 1/4 in 3D).

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d`` (or ``nn.Conv1d``).
        in_channels: channels of the tapped maps, coarse to fine, e.g. ``[256, 128, 64, 32]`` (>= 1 levels).
        out_dim: representation width D (default choice: :data:`DEFAULT_REP_DIM`, 128 in 2D, 64 in 3D).
        output_level: index into ``in_channels`` (negative allowed) of the level whose spatial size the output
            has; ``-1`` = the finest tapped map (the papers' full resolution). Default ``-2``
            (:data:`DEFAULT_OUTPUT_LEVEL` gives -2 for 2D, -3 for 3D).
        nonlinear: insert ``nonlin`` after each residual conv.
        nonlin: activation class used when ``nonlinear`` (default ``nn.LeakyReLU``, as nnU-Net).

    Shapes:
        forward(features): list of ``L`` tensors ``[B, in_channels[l], *spatial_l]`` (float), coarse to fine
        -> ``[B, out_dim, *spatial_{output_level}]`` (same dtype as the fused features).

    Memory: the fused width at the output level is ``sum(in_channels)``; tap fewer levels to save memory.

    Raises:
        ValueError: empty ``in_channels``, non-positive channel counts or ``out_dim``, ``output_level`` out of
            range; at forward time a wrong number of levels or channel mismatch.
    """

    def __init__(self, conv_op: Type[nn.Module], in_channels: Sequence[int], out_dim: int,
                 output_level: int = -2, nonlinear: bool = False, nonlin: Type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) == 0:
            raise ValueError('FPNProjectionHead needs at least one input level, got in_channels=[]')
        if any(c <= 0 for c in in_channels):
            raise ValueError(f'FPNProjectionHead in_channels must be > 0, got {in_channels}')
        if out_dim <= 0:
            raise ValueError(f'FPNProjectionHead out_dim must be > 0, got {out_dim}')
        n = len(in_channels)
        if not -n <= output_level < n:
            raise ValueError(f'FPNProjectionHead output_level must be in [{-n}, {n - 1}] for {n} levels, '
                             f'got {output_level}')
        self.in_channels, self.out_dim = in_channels, int(out_dim)
        self.output_level = output_level % n
        widths = [sum(in_channels[:l + 1]) for l in range(n)]  # running concat width after level l
        self.fuse = nn.ModuleList([_pointwise(conv_op, w, w) for w in widths])
        self.act = nonlin() if nonlinear else nn.Identity()
        self.out = _pointwise(conv_op, widths[-1], self.out_dim)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f'FPNProjectionHead expects {len(self.in_channels)} feature maps, got {len(features)}')
        for l, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.shape[1] != c:
                raise ValueError(f'FPNProjectionHead level {l}: expected {c} channels, got {tuple(f.shape)}')
        out_size = features[self.output_level].shape[2:]
        mode = _LINEAR_MODE[features[0].ndim]
        x = None
        for l, f in enumerate(features):
            size = features[l].shape[2:] if l <= self.output_level else out_size
            if f.shape[2:] != size:  # finer than the output level: average-pool down
                f = F.interpolate(f, size=size, mode='area')
            if x is not None:
                if x.shape[2:] != size:
                    x = F.interpolate(x, size=size, mode=mode, align_corners=False)
                f = torch.cat((x, f), dim=1)
            x = self.act(self.fuse[l](f)) + f
        return self.out(x)


class Predictor(nn.Module):
    """Student-only predictor ``P_q``: two bias-free pointwise layers ``dim -> hidden -> dim`` (spec §2.3).

    Applied on top of the student's projection only; the teacher uses its (EMA) projection directly. This
    asymmetry is BYOL's predictor. Code-faithful default is linear (no activation).

    Args:
        conv_op: ``nn.Conv2d`` / ``nn.Conv3d`` for dense maps ``[B, dim, *spatial]``, or ``nn.Linear`` for
            vectors ``[B, dim]`` (the pre-training embedding predictor, 512 -> 512 -> 512).
        dim: input and output width.
        hidden: width of the middle layer (default ``dim``).
        nonlinear: put ``nonlin`` between the two layers.
        nonlin: activation class (default ``nn.LeakyReLU``).

    Shapes: ``[B, dim, *spatial]`` (or ``[B, dim]``) -> same shape.
    """

    def __init__(self, conv_op: Type[nn.Module], dim: int, hidden: Optional[int] = None, nonlinear: bool = False,
                 nonlin: Type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        hidden = dim if hidden is None else hidden
        if dim <= 0 or hidden <= 0:
            raise ValueError(f'Predictor dim and hidden must be > 0, got dim={dim}, hidden={hidden}')
        self.net = nn.Sequential(_pointwise(conv_op, dim, hidden), nonlin() if nonlinear else nn.Identity(),
                                 _pointwise(conv_op, hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingHead(nn.Module):
    """Global average pool over all spatial axes, then ``Linear(C, hidden) -> Linear(hidden, out_dim)``.

    The MONA pre-training latent head (spec §1.2/§2.5: ``AdaptiveAvgPool(1) -> Linear(C, C) -> Linear(C, 512)``,
    linear in the released code), usable for 2D and 3D inputs alike; an input that is already ``[B, C]`` is
    taken as pooled.

    Args:
        in_channels: C, channels of the input map.
        out_dim: embedding width (papers: 512).
        hidden: width of the first layer (default ``in_channels``).
        nonlinear: put ``nonlin`` between the two layers (the papers' text; the code is linear).
        nonlin: activation class (default ``nn.LeakyReLU``).

    Shapes: ``[B, C, *spatial]`` or ``[B, C]`` (float) -> ``[B, out_dim]`` (not normalised).
    """

    def __init__(self, in_channels: int, out_dim: int, hidden: Optional[int] = None, nonlinear: bool = False,
                 nonlin: Type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        hidden = in_channels if hidden is None else hidden
        if in_channels <= 0 or out_dim <= 0 or hidden <= 0:
            raise ValueError(f'EmbeddingHead sizes must be > 0, got in_channels={in_channels}, '
                             f'hidden={hidden}, out_dim={out_dim}')
        self.in_channels = int(in_channels)
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nonlin() if nonlinear else nn.Identity(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != self.in_channels:
            raise ValueError(f'EmbeddingHead expects [B, {self.in_channels}, *spatial], got {tuple(x.shape)}')
        return self.net(x.flatten(2).mean(-1) if x.ndim > 2 else x)
