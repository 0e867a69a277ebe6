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
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Type

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
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


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
        forward(features, predictor=None): list of ``L`` tensors ``[B, in_channels[l], *spatial_l]`` (float),
        coarse to fine -> ``[B, out_dim, *spatial_{output_level}]`` (same dtype as the fused features).

    Cost: a linear head (the default) is one linear map, so :meth:`forward` evaluates it level by level (each
    level projected straight to ``out_dim`` channels at its own resolution, see :meth:`level_weights`), never
    materialising the ``sum(in_channels)``-wide fused map; :meth:`forward_layered` is the layer-by-layer
    evaluation above (used for nonlinear heads), equal to float rounding.

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

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(f'FPNProjectionHead expects {len(self.in_channels)} feature maps, got {len(features)}')
        for l, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.shape[1] != c:
                raise ValueError(f'FPNProjectionHead level {l}: expected {c} channels, got {tuple(f.shape)}')

    def _working_sizes(self, features: Sequence[torch.Tensor]):
        out_size = features[self.output_level].shape[2:]
        return [f.shape[2:] if l <= self.output_level else out_size for l, f in enumerate(features)]

    @property
    def is_linear(self) -> bool:
        return isinstance(self.act, nn.Identity)

    def level_weights(self, predictor: Optional['Predictor'] = None) -> List[torch.Tensor]:
        """The linear head as one matrix per level: ``G_l [D, C_l]`` (float32, differentiable in the parameters)
        such that ``forward(f) = sum_l resize_l(G_l f_l)``, where ``resize_l`` is the chain of resizes level ``l``
        goes through. 1x1 convolutions act on channels and resizes on space, so they commute; unrolling the
        residual convolutions coarse to fine gives ``G_l`` as a product of the conv matrices. With ``predictor``
        (a linear :class:`Predictor`) its matrix is folded in too."""
        if not self.is_linear:
            raise RuntimeError('level_weights needs a linear head (nonlinear=False)')
        dtype = torch.promote_types(self.out.weight.dtype, torch.float32)   # float32, or float64 parameters
        with torch.autocast(device_type=self.out.weight.device.type, enabled=False):
            m = self.out.weight.flatten(1).to(dtype)                                   # [D, w_{L-1}]
            if predictor is not None:
                m = predictor.matrix().to(dtype) @ m
            weights = []
            for l in range(len(self.in_channels) - 1, -1, -1):
                m = m + m @ self.fuse[l].weight.flatten(1).to(dtype)                 # M (I + F_l)
                split = m.shape[1] - self.in_channels[l]
                weights.append(m[:, split:])
                m = m[:, :split]
        return weights[::-1]

    def forward(self, features: Sequence[torch.Tensor], predictor: Optional['Predictor'] = None) -> torch.Tensor:
        """The representation map; with ``predictor``, ``predictor(head(features))`` in one pass.

        A linear head (the default) is evaluated level by level with :meth:`level_weights`: each level is
        projected to ``D`` channels at its own resolution and resized, instead of running the ``sum(C)``-wide
        residual convolutions over every pixel of the output level. Same function and gradients as
        :meth:`forward_layered` (the papers' layer-by-layer order) up to float rounding, at a fraction of the cost.
        """
        self._check_features(features)
        if not self.is_linear or (predictor is not None and not predictor.is_linear):
            out = self.forward_layered(features)
            return out if predictor is None else predictor(out)
        weights = self.level_weights(predictor)
        return self._linear_map(features, weights, self._coarse_sum(features, weights))

    def _linear_map(self, features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    coarse: Optional[torch.Tensor]) -> torch.Tensor:
        """The dense map from the level weights and the :meth:`_coarse_sum` of the levels below the output, built
        as rows ``[B, P, D]`` and returned as ``[B, D, *sp]`` in channels-last memory (a view of the rows), so that
        losses reading per-position vectors read contiguous rows."""
        out_size = tuple(features[self.output_level].shape[2:])
        # the levels from the output level on are pointwise there: one product over their concatenated channels,
        # [B, C, P] read transposed, added to the resized coarse part in the same call
        fine = [f if tuple(f.shape[2:]) == out_size else F.interpolate(f, size=out_size, mode='area')
                for f in features[self.output_level:]]
        fine = fine[0] if len(fine) == 1 else torch.cat(fine, dim=1)
        fine_rows = fine.flatten(2).transpose(1, 2)                                          # [B, P, C_fine]
        weight = torch.cat(weights[self.output_level:], dim=1).to(fine.dtype).T             # [C_fine, D]
        if coarse is None:
            rows = fine_rows @ weight
        else:
            if tuple(coarse.shape[2:]) != out_size:
                coarse = F.interpolate(coarse.contiguous(memory_format=_CHANNELS_LAST.get(coarse.ndim,
                                                                                          torch.contiguous_format)),
                                       size=out_size, mode=_LINEAR_MODE[coarse.ndim], align_corners=False)
            coarse_rows = coarse.movedim(1, -1).reshape(fine_rows.shape[0], -1, weight.shape[1])  # a view if resized
            # added into the resized coarse part in place (no one else reads it, and neither the resize nor the
            # product needs it for the backward): one whole map at a time, not two
            rows = coarse_rows.to(fine_rows.dtype).baddbmm_(fine_rows, weight.expand(fine_rows.shape[0], -1, -1))
        return rows.view(rows.shape[0], *out_size, rows.shape[2]).movedim(-1, 1)

    def _coarse_sum(self, features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
                    ) -> Optional[torch.Tensor]:
        """``sum_{l < output_level} resize(G_l f_l)`` at the size of level ``output_level - 1`` (``None`` if the output
        level is the coarsest): the part of the linear map that needs one more resize to the output size."""
        coarse = None
        for f, g in zip(features[:self.output_level], weights[:self.output_level]):
            if coarse is not None and coarse.shape[2:] != f.shape[2:]:
                coarse = F.interpolate(coarse, size=f.shape[2:], mode=_LINEAR_MODE[f.ndim], align_corners=False)
            proj = _pointwise_conv(f, g)
            coarse = proj if coarse is None else coarse + proj
        return coarse

    def represent(self, features: Sequence[torch.Tensor], predictor: Optional['Predictor'] = None
                  ) -> 'RepresentationMap':
        """The map ``forward(features, predictor)`` as a :class:`RepresentationMap`, evaluated only where it is
        read (positions, spatial means), for losses that read a few thousand positions of it."""
        self._check_features(features)
        return RepresentationMap(self, features, predictor)

    def forward_layered(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head evaluated layer by layer as written in the class docstring (any head, linear or not)."""
        self._check_features(features)
        sizes = self._working_sizes(features)
        mode = _LINEAR_MODE[features[0].ndim]
        x = None
        for l, (f, size) in enumerate(zip(features, sizes)):
            if f.shape[2:] != size:  # finer than the output level: average-pool down
                f = F.interpolate(f, size=size, mode='area')
            if x is not None:
                if x.shape[2:] != size:
                    x = F.interpolate(x, size=size, mode=mode, align_corners=False)
                f = torch.cat((x, f), dim=1)
            x = self.act(self.fuse[l](f)) + f
        return self.out(x)


def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 (x1) convolution of ``x [B, C, *sp]`` with ``weight [D, C]`` (in ``x``'s dtype)."""
    weight = weight.to(x.dtype).contiguous()   # a contiguous weight keeps the fast (mkldnn) convolution
    return _CONV[x.ndim](x, weight.view(*weight.shape, *([1] * (x.ndim - 2))))


def _linear_resize_matrix(in_len: int, out_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[out_len, in_len]``: the 1-D linear resize of ``F.interpolate(..., align_corners=False)`` as a matrix (its
    (bi/tri)linear modes are this matrix applied along each axis)."""
    eye = torch.eye(in_len, device=device, dtype=dtype).unsqueeze(0)                  # [1, in, in]
    return F.interpolate(eye, size=out_len, mode='linear', align_corners=False)[0].T


class RepresentationMap:
    """The output ``[B, D, *sp]`` of a :class:`FPNProjectionHead` (optionally followed by a :class:`Predictor`)
    over given features, evaluated on demand: at flat positions (:meth:`at`), as per-image spatial means
    (:meth:`spatial_mean`) or whole (:meth:`dense`, :meth:`detached`). Built by :meth:`FPNProjectionHead.represent`.

    For a linear head the map is ``sum_l resize_l(G_l f_l)`` (:meth:`FPNProjectionHead.level_weights`), and every
    read is a weighted sum of feature vectors followed by one product with ``[G_0 .. G_{L-1}]``:

    * a level at the output resolution is read at the position itself; a finer one (area-pooled in the head) as
      the mean of its pooling window (a block when the sizes divide, else the pooled map is made);
    * a coarser level goes through a chain of linear resizes; each is a sparse matrix with at most ``2^nd``
      entries per output position, so the position is traced back through the chain to the level's positions
      and their products of interpolation weights (4 per resize in 2D, 8 in 3D);
    * a spatial mean weighs each level's positions by the column means of the resize matrices (per axis).

    Values and gradients (to the heads' parameters and the features) are those of the dense map read at the
    same places, to float rounding; nothing of the size of the map is made, so its backward writes only the
    features' gradients. A nonlinear head or predictor falls back to the dense map.

    Positions are flat indices into ``[B, *sp]`` in raster order (``mask.flatten().nonzero()`` of a
    ``[B, *sp]`` mask), as the losses draw them.
    """

    def __init__(self, head: 'FPNProjectionHead', features: Sequence[torch.Tensor],
                 predictor: Optional['Predictor'] = None):
        self.head, self.features, self.predictor = head, list(features), predictor
        f_out = self.features[head.output_level]
        self.shape = torch.Size((f_out.shape[0], head.out_dim, *f_out.shape[2:]))
        self.ndim, self.device = len(self.shape), f_out.device
        self.linear = head.is_linear and (predictor is None or predictor.is_linear)
        self._dense = self._detached = self._weight = None
        self._pooled = {}

    @property
    def spatial_size(self) -> Tuple[int, ...]:
        return tuple(self.shape[2:])

    def dense(self) -> torch.Tensor:
        """The whole map ``[B, D, *sp]`` (cached; with gradient when the parameters or features have one)."""
        if self._dense is None:
            self._dense = self.head(self.features, self.predictor)
        return self._dense

    def detached(self) -> torch.Tensor:
        """The whole map without gradient (cached); for what a loss reads as a constant."""
        if self._detached is None:
            if self._dense is not None:
                self._detached = self._dense.detach()
            else:
                with torch.no_grad():
                    self._detached = self.head(self.features, self.predictor)
        return self._detached

    def take_detached(self) -> Tuple[torch.Tensor, bool]:
        """The whole map without gradient, handed to the caller: ``(map, owned)``. ``owned`` is True when nothing
        else holds the map's storage (it is made here and not cached), so the caller may overwrite it in place."""
        if self._detached is None and self._dense is None:
            with torch.no_grad():
                return self.head(self.features, self.predictor), True
        return self.detached(), False

    def _level_weight(self) -> torch.Tensor:
        """``[D, sum C_l]``: the level weights side by side, so that one product maps every level's read."""
        if self._weight is None:
            self._weight = torch.cat(self.head.level_weights(self.predictor), dim=1)
        return self._weight

    def _finer(self, level: int) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        """A level at or finer than the output level and its pooling block (all ones at the output level); when its
        size is not a multiple of the output size, the area-pooled map and block 1."""
        if level not in self._pooled:
            f, out_size = self.features[level], self.spatial_size
            if tuple(f.shape[2:]) != out_size and any(i % o for i, o in zip(f.shape[2:], out_size)):
                f = F.interpolate(f, size=out_size, mode='area')
            self._pooled[level] = f, tuple(i // o for i, o in zip(f.shape[2:], out_size))
        return self._pooled[level]

    def _resize_chain(self) -> List[Optional[List[torch.Tensor]]]:
        """For each level below the output: the per-axis ``[out, in]`` matrices of the resize from its size to the
        next level's (``None`` where the sizes agree: no resize)."""
        sizes = self.head._working_sizes(self.features)
        dtype = torch.promote_types(self.features[0].dtype, torch.float32)
        chain = []
        for l in range(self.head.output_level):
            src, dst = tuple(sizes[l]), tuple(sizes[l + 1])
            chain.append(None if src == dst else [_linear_resize_matrix(i, o, self.device, dtype)
                                                  for i, o in zip(src, dst)])
        return chain

    @staticmethod
    def _unravel(p: torch.Tensor, size: Sequence[int]) -> List[torch.Tensor]:
        coords = []
        for s in reversed(size):                        # raster order: the last axis varies fastest
            coords.append(p % s)
            p = p // s
        return coords[::-1]

    @staticmethod
    def _read(f: torch.Tensor, b: torch.Tensor, coords: Sequence[torch.Tensor]) -> torch.Tensor:
        """``f [B, C, *sp]`` at rows ``b [m]`` and per-axis coordinates ``[m]`` -> ``[m, C]`` (one gather)."""
        size = f.shape[2:]
        flat = sum(c * math.prod(size[a + 1:]) for a, c in enumerate(coords))
        return f.reshape(f.shape[0], f.shape[1], -1)[b, :, flat]

    def at(self, flat: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` (the features' dtype): the map at flat positions ``flat [n]`` (long) into ``[B, *sp]``."""
        flat = flat.to(self.device, torch.long)
        n_pos = math.prod(self.spatial_size)
        b, p = flat // n_pos, flat % n_pos
        if not self.linear:
            return self.dense().reshape(self.shape[0], self.shape[1], -1)[b, :, p]
        ol, n = self.head.output_level, flat.shape[0]
        coords = self._unravel(p, self.spatial_size)
        reads = [None] * len(self.features)
        for level in range(ol, len(self.features)):    # the mean of the pooling block at the position
            f, block = self._finer(level)
            offsets = list(itertools.product(*[range(k) for k in block]))
            grid = [torch.stack([coords[a] * block[a] + o[a] for o in offsets], dim=1) for a in range(len(block))]
            vals = self._read(f, b[:, None].expand_as(grid[0]).reshape(-1), [g.reshape(-1) for g in grid])
            vals = vals.view(n, len(offsets), -1)
            reads[level] = vals.mean(1) if len(offsets) > 1 else vals[:, 0]
        # coarser levels: trace the positions back through the resizes, carrying the interpolation weights
        src, weight = [c[:, None] for c in coords], None   # per-axis coordinates [n, k], their weights [n, k]
        for level, resize in zip(range(ol - 1, -1, -1), reversed(self._resize_chain())):
            if resize is not None:
                taps = [m[c].topk(min(2, m.shape[1]), dim=-1) for m, c in zip(resize, src)]   # (w, i) per axis
                corners = list(itertools.product(*[range(t.indices.shape[-1]) for t in taps]))
                src = [torch.stack([taps[a].indices[..., c[a]] for c in corners], dim=-1).flatten(1)
                       for a in range(len(taps))]
                w = math.prod([torch.stack([taps[a].values[..., c[a]] for c in corners], dim=-1)
                               for a in range(len(taps))]).flatten(1)                           # [n, k * corners]
                weight = w if weight is None else (weight[..., None] * w.view(n, weight.shape[1], -1)).flatten(1)
            f = self.features[level]
            k = src[0].shape[1]
            vals = self._read(f, b[:, None].expand(n, k).reshape(-1), [c.reshape(-1) for c in src]).view(n, k, -1)
            reads[level] = vals[:, 0] if weight is None else (weight.to(vals.dtype)[..., None] * vals).sum(1)
        z = torch.cat(reads, dim=1)                                                         # [n, sum C_l]
        return z @ self._level_weight().to(z.dtype).T

    def spatial_mean(self) -> torch.Tensor:
        """``[B, D]``: the mean of every image's map over its positions (``dense().flatten(2).mean(-1)``)."""
        if not self.linear:
            return self.dense().flatten(2).mean(-1)
        ol = self.head.output_level
        reads = [None] * len(self.features)
        for level in range(ol, len(self.features)):    # block pooling keeps a level's mean
            f, _ = self._finer(level)
            reads[level] = f.flatten(2).mean(-1)
        # coarser levels: the mean over the outputs of a resize is its column means; per axis, back the chain
        columns = [torch.full((s,), 1.0 / s, device=self.device, dtype=torch.promote_types(self.features[0].dtype,
                                                                                          torch.float32))
                   for s in self.spatial_size]
        for level, resize in zip(range(ol - 1, -1, -1), reversed(self._resize_chain())):
            if resize is not None:
                columns = [u @ m for u, m in zip(columns, resize)]
            pooled = self.features[level].to(columns[0].dtype)
            for u in reversed(columns):                 # contract the last spatial axis first
                pooled = pooled @ u
            reads[level] = pooled.to(self.features[level].dtype)
        z = torch.cat(reads, dim=1)                                                         # [B, sum C_l]
        return z @ self._level_weight().to(z.dtype).T

    def zero(self) -> torch.Tensor:
        """A float32 zero attached to the graph of every parameter and feature the map depends on."""
        if not self.linear:
            return self.dense().sum().float() * 0.0
        return self.at(torch.zeros(1, dtype=torch.long, device=self.device)).sum().float() * 0.0


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

    @property
    def is_linear(self) -> bool:
        return isinstance(self.net[1], nn.Identity)

    def matrix(self) -> torch.Tensor:
        """``[dim, dim]``, the product of the two layers (linear predictors only), differentiable; float32 (float64
        for float64 parameters)."""
        if not self.is_linear:
            raise RuntimeError('Predictor.matrix needs a linear predictor (nonlinear=False)')
        dtype = torch.promote_types(self.net[0].weight.dtype, torch.float32)
        with torch.autocast(device_type=self.net[0].weight.device.type, enabled=False):
            return self.net[2].weight.flatten(1).to(dtype) @ self.net[0].weight.flatten(1).to(dtype)

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
