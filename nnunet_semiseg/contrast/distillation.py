"""ACTION's contrastive distillation with soft-labelled anchors: a global (per image) and a local (per window) form.

ACTION (You et al., IPMI 2023, arXiv 2206.02307), following ISD (Tejankar et al., ICCV 2021): the student learns to
reproduce the teacher's *similarity distribution* over a bank of anchors (teacher embeddings of recently seen
images). With a sharp teacher (``tau_t = 0.01``) and a softer student (``tau_s = 0.1``) the teacher puts almost all
mass on the few most similar anchors, so the student is taught which negatives are semantically close ("soft
labelling of the negatives") without any explicit top-k. The loss is ``KL(p_t || p_s)``.

Building blocks here: :class:`GlobalDistillationLoss`, :class:`LocalDistillationLoss`, the window helpers
:func:`window_starts`, :func:`window_slices`, :func:`num_windows`, :func:`pool_windows`, and the local heads
:class:`LocalProjectionHead` / :class:`LocalPredictionHead`. See ``docs/action.md``.
"""
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semiseg.contrast.memory import FeatureQueue

IntOrSeq = Union[int, Sequence[int]]


def _check_tau(name: str, tau: float) -> float:
    if not tau > 0:
        raise ValueError(f'{name} must be > 0, got {tau}')
    return float(tau)


def relational_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher_logits) || softmax(student_logits))`` over the last axis, summed there and averaged over
    all leading axes (``'batchmean'`` for 2-D inputs). Computed in float32; 0-dim tensor."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    rows = max(1, log_p_s.numel() // max(1, log_p_s.shape[-1]))
    return F.kl_div(log_p_s, log_p_t, reduction='sum', log_target=True) / rows


class GlobalDistillationLoss(nn.Module):
    """ACTION's global contrastive distillation (ACTION §"global", spec ``action.md`` §2.1).

    For each image ``b``, with the bank ``A = {a_1..a_K}`` of L2-normalised *teacher* embeddings of previously seen
    images::

        p_s[b] = softmax_j(cos(z_s[b], a_j) / tau_s),   p_t[b] = softmax_j(cos(z_t[b], a_j) / tau_t)
        loss   = (1/B) sum_b KL(p_t[b] || p_s[b])

    The teacher side is detached (no gradient reaches the teacher or its heads). While the bank is empty the loss is
    ``student_emb.sum() * 0`` (a zero that keeps the graph, so DDP sees every parameter used). The bank is a
    :class:`FeatureQueue` ring buffer: no ``K % B`` constraint, and unlike the released code it starts empty instead of
    filled with Gaussian noise, so only real teacher embeddings are ever anchors.

    Args:
        dim: embedding dimension ``D`` (512 in ACTION 2D, 128 in 3D).
        bank_size: number of banked images ``K`` (36, as in the paper and code).
        tau_s: student temperature (0.1). Overridable per call (ACTION++ schedules it with ``cosine_tau``).
        tau_t: teacher temperature (0.01 in 2D and per the paper; the released 3D script uses 0.6).

    Shapes:
        ``forward(student_emb [B, D], teacher_emb [B, D], tau_s=None, tau_t=None, enqueue=True) -> 0-dim tensor``.
        With ``enqueue=True`` (default) the normalised teacher embeddings are pushed into the bank *after* the loss is
        computed, so the current batch is never its own anchor. ``enqueue(teacher_emb)`` does the push alone.

    Buffers (save with the checkpoint): ``bank.feats [K, D]``, ``bank.labels``, ``bank.ptr``, ``bank.count``.

    Raises:
        ValueError: non-positive ``dim``/``bank_size``/temperatures, or embeddings that are not ``[B, D]`` alike.
    """

    def __init__(self, dim: int, bank_size: int = 36, tau_s: float = 0.1, tau_t: float = 0.01):
        super().__init__()
        if dim <= 0:
            raise ValueError(f'dim must be > 0, got {dim}')
        if bank_size <= 0:
            raise ValueError(f'bank_size must be > 0, got {bank_size}')
        self.dim, self.bank_size = int(dim), int(bank_size)
        self.tau_s, self.tau_t = _check_tau('tau_s', tau_s), _check_tau('tau_t', tau_t)
        self.bank = FeatureQueue(self.bank_size, self.dim)

    @torch.no_grad()
    def enqueue(self, teacher_emb: torch.Tensor) -> None:
        """Push L2-normalised ``teacher_emb [B, D]`` into the bank (oldest entries are overwritten)."""
        self.bank.push(F.normalize(teacher_emb.detach().float(), dim=1))

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, tau_s: Optional[float] = None,
                tau_t: Optional[float] = None, enqueue: bool = True) -> torch.Tensor:
        if student_emb.ndim != 2 or student_emb.shape != teacher_emb.shape or student_emb.shape[1] != self.dim:
            raise ValueError(f'expected student and teacher embeddings [B, {self.dim}], got '
                             f'{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}')
        tau_s = self.tau_s if tau_s is None else _check_tau('tau_s', tau_s)
        tau_t = self.tau_t if tau_t is None else _check_tau('tau_t', tau_t)
        if len(self.bank) == 0:
            loss = student_emb.sum(dtype=torch.float32) * 0  # float32 sum: a half one overflows to inf, inf * 0 = NaN
        else:
            with torch.autocast(device_type=student_emb.device.type, enabled=False):   # float32 logits
                anchors = self.bank.get().float()                                   # [K', D], unit rows
                z_s = F.normalize(student_emb.float(), dim=1)
                with torch.no_grad():
                    z_t = F.normalize(teacher_emb.detach().float(), dim=1)
                    teacher_logits = z_t @ anchors.T / tau_t
                loss = relational_kl(z_s @ anchors.T / tau_s, teacher_logits)
        if enqueue:
            self.enqueue(teacher_emb)
        return loss


# ----------------------------------------------------------------------------------------------------------------
# windows

def _per_axis(value: IntOrSeq, ndim: int, name: str) -> Tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f'{name} must be an int or {ndim} ints, got {value}')
    if any(v < 1 for v in values):
        raise ValueError(f'{name} must be >= 1 on every axis, got {value}')
    return values


def window_starts(size: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows of length ``window`` moved by ``stride`` along an axis of length ``size``, the last
    one flush with the border so that every position is covered. A window longer than the axis is clipped to it
    (one window at 0). Count: ``ceil((size - window) / stride) + 1`` for ``size >= window``."""
    if size < 1 or window < 1 or stride < 1:
        raise ValueError(f'size, window and stride must be >= 1, got {size}, {window}, {stride}')
    if window >= size:
        return [0]
    starts = list(range(0, size - window, stride))
    starts.append(size - window)
    return starts


def _resolve_windows(spatial_shape: Sequence[int], window: IntOrSeq, stride: Optional[IntOrSeq]):
    ndim = len(spatial_shape)
    windows = _per_axis(window, ndim, 'window')
    windows = tuple(min(w, s) for w, s in zip(windows, spatial_shape))
    strides = tuple(max(1, w // 2) for w in windows) if stride is None else _per_axis(stride, ndim, 'stride')
    return windows, strides


def window_slices(spatial_shape: Sequence[int], window: IntOrSeq, stride: Optional[IntOrSeq] = None
                  ) -> List[Tuple[slice, ...]]:
    """All windows covering ``spatial_shape`` (2-D or 3-D or any N-D), as tuples of slices, row-major order (the last
    axis varies fastest; the same order as :func:`pool_windows`). ``stride`` defaults to ``window // 2``."""
    windows, strides = _resolve_windows(spatial_shape, window, stride)
    per_axis = [[slice(a, a + w) for a in window_starts(s, w, st)]
                for s, w, st in zip(spatial_shape, windows, strides)]
    return list(itertools.product(*per_axis))


def num_windows(spatial_shape: Sequence[int], window: IntOrSeq, stride: Optional[IntOrSeq] = None) -> int:
    """Number of windows :func:`window_slices` / :func:`pool_windows` produce: ``prod(ceil((S-w)/stride) + 1)``."""
    windows, strides = _resolve_windows(spatial_shape, window, stride)
    n = 1
    for s, w, st in zip(spatial_shape, windows, strides):
        n *= len(window_starts(s, w, st))
    return n


def pool_windows(x: torch.Tensor, window: IntOrSeq, output_size: IntOrSeq, stride: Optional[IntOrSeq] = None
                 ) -> torch.Tensor:
    """Adaptive average pooling of every window, vectorised: ``x [B, C, *spatial] -> [B, P, C, *output_size]`` float32.

    Equal (to float rounding) to cropping each window of :func:`window_slices` and applying
    ``F.adaptive_avg_pool{n}d(crop, output_size)``: the same cell boundaries ``[floor(i w / s), ceil((i+1) w / s))``.
    Works axis by axis with a cumulative sum, so the cost is a few passes over ``x`` whatever the number of windows.
    """
    if x.ndim < 3:
        raise ValueError(f'x must be [B, C, *spatial], got {tuple(x.shape)}')
    spatial = tuple(x.shape[2:])
    ndim = len(spatial)
    windows, strides = _resolve_windows(spatial, window, stride)
    outs = _per_axis(output_size, ndim, 'output_size')
    y = x.float()
    counts = []
    for axis, (size, w, st, s) in enumerate(zip(spatial, windows, strides, outs)):
        dim = 2 + axis
        starts = torch.tensor(window_starts(size, w, st), device=x.device)
        cell = torch.arange(s, device=x.device)
        lo = (starts[:, None] + (cell * w) // s).flatten()
        hi = (starts[:, None] + ((cell + 1) * w + s - 1) // s).flatten()
        pad_shape = list(y.shape)
        pad_shape[dim] = 1
        cum = torch.cat([y.new_zeros(pad_shape), y.cumsum(dim)], dim=dim)
        length_shape = [1] * y.ndim
        length_shape[dim] = -1
        y = (cum.index_select(dim, hi) - cum.index_select(dim, lo)) / (hi - lo).to(y.dtype).view(length_shape)
        counts.append(len(starts))
    b, c = x.shape[:2]
    y = y.reshape(b, c, *itertools.chain.from_iterable(zip(counts, outs)))   # [B, C, n1, s1, n2, s2, ...]
    window_dims = [2 + 2 * i for i in range(ndim)]
    cell_dims = [3 + 2 * i for i in range(ndim)]
    y = y.permute(0, *window_dims, 1, *cell_dims)                          # [B, n1, n2, ..., C, s1, s2, ...]
    return y.reshape(b, -1, c, *outs)


class LocalProjectionHead(nn.Module):
    """ACTION's local projection head: per window, adaptive average pooling to ``pool_size`` cells, then a 1x1 conv
    ``C -> 2C`` and a 1x1 conv ``2C -> C`` (no nonlinearity, as in the released code).

    Both convolutions are affine and pointwise, so pooling first is exactly equivalent and much cheaper.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d`` (the network's ``conv_op``), so one class serves 2D and 3D.
        channels: ``C``, the channels of the tapped map (ACTION: the segmentation logits, ``C`` = number of classes).
        pool_size: cells per window per axis (8 in 2D, 4 in 3D in the code).
        window: window size per axis (64 in 2D, 20 in 3D in the code).
        stride: window stride (default ``window // 2``); the last window is flush with the border.

    Shapes: ``x [B, C, *spatial] -> [B, P, C, *pool]`` with ``P = num_windows(spatial, window, stride)``.
    """

    def __init__(self, conv_op: type, channels: int, pool_size: IntOrSeq, window: IntOrSeq,
                 stride: Optional[IntOrSeq] = None):
        super().__init__()
        if channels <= 0:
            raise ValueError(f'channels must be > 0, got {channels}')
        self.channels, self.pool_size, self.window, self.stride = int(channels), pool_size, window, stride
        self.expand = conv_op(channels, 2 * channels, kernel_size=1)
        self.reduce = conv_op(2 * channels, channels, kernel_size=1)

    def num_windows(self, spatial_shape: Sequence[int]) -> int:
        return num_windows(spatial_shape, self.window, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f'expected {self.channels} channels, got {tuple(x.shape)}')
        pooled = pool_windows(x, self.window, self.pool_size, self.stride)   # [B, P, C, *pool], float32
        b, p = pooled.shape[:2]
        out = self.reduce(self.expand(pooled.flatten(0, 1)))
        return out.reshape(b, p, *out.shape[1:])


class LocalPredictionHead(nn.Module):
    """The student's local predictor in ACTION: two 1x1 convs ``C -> C`` (no nonlinearity), BYOL-style.

    Shapes: ``[B, P, C, *pool] -> [B, P, C, *pool]`` (the output of :class:`LocalProjectionHead`)."""

    def __init__(self, conv_op: type, channels: int):
        super().__init__()
        if channels <= 0:
            raise ValueError(f'channels must be > 0, got {channels}')
        self.layers = nn.Sequential(conv_op(channels, channels, kernel_size=1),
                                    conv_op(channels, channels, kernel_size=1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b, p = e.shape[:2]
        out = self.layers(e.flatten(0, 1))
        return out.reshape(b, p, *out.shape[1:])


class LocalDistillationLoss(nn.Module):
    """ACTION's local contrastive distillation in its intended per-window form (spec ``action.md`` §2.2; the
    released code compares arbitrary 36-float chunks of the flattened tensors instead, bug B6, and skips the last
    window row/column in 2D, bug B9; windows from :func:`window_slices` cover the whole patch).

    For every image ``b`` and window ``p``, with ``e = flatten(window embedding)`` (student: projection + predictor,
    teacher: projection) and the bank of the teacher window embeddings of the last ``K`` images::

        anchors='same_window' (option A, default): A_{b,p} = {bank[k, p] : k < K}                 (K anchors)
        anchors='all_windows' (option B):          A_{b,p} = {bank[k, q] : k < K, q < P}          (K*P anchors)
        loss = mean_{b,p} KL( softmax(cos(e_t[b,p], A)/tau_t) || softmax(cos(e_s[b,p], A)/tau_s) )

    Teacher and student must see the same geometry (photometric differences only), so window ``p`` is the same
    anatomy in both. The teacher side is detached; while the bank is empty the loss is ``student.sum() * 0``.

    Args:
        num_windows: ``P``, windows per image (:func:`num_windows` of the patch size; fixed for a run).
        embed_dim: ``E``, the flattened window embedding size (``C * prod(pool)``, e.g. ``C*64`` in 2D).
        bank_size: ``K`` banked images (36).
        tau_s, tau_t: temperatures (0.1, 0.01), overridable per call.
        anchors: ``'same_window'`` or ``'all_windows'``.

    Shapes:
        ``forward(student [B, P, *e], teacher [B, P, *e], tau_s=None, tau_t=None, enqueue=True) -> 0-dim``, where
        ``prod(e) = E``. With ``enqueue=True`` the teacher window embeddings (normalised) are pushed after the loss.

    Buffers (checkpoint): ``bank.*`` with ``bank.feats [K, P*E]`` (one row per image).

    Raises:
        ValueError: bad sizes, an unknown ``anchors``, non-positive temperatures, or inputs of the wrong shape.
    """

    def __init__(self, num_windows: int, embed_dim: int, bank_size: int = 36, tau_s: float = 0.1,
                 tau_t: float = 0.01, anchors: str = 'same_window'):
        super().__init__()
        if num_windows <= 0:
            raise ValueError(f'num_windows must be > 0, got {num_windows}')
        if embed_dim <= 0:
            raise ValueError(f'embed_dim must be > 0, got {embed_dim}')
        if bank_size <= 0:
            raise ValueError(f'bank_size must be > 0, got {bank_size}')
        if anchors not in ('same_window', 'all_windows'):
            raise ValueError(f"anchors must be 'same_window' or 'all_windows', got {anchors!r}")
        self.num_windows, self.embed_dim, self.bank_size = int(num_windows), int(embed_dim), int(bank_size)
        self.tau_s, self.tau_t = _check_tau('tau_s', tau_s), _check_tau('tau_t', tau_t)
        self.anchors = anchors
        self.bank = FeatureQueue(self.bank_size, self.num_windows * self.embed_dim)

    def _flatten(self, e: torch.Tensor, name: str) -> torch.Tensor:
        if e.ndim < 3 or e.shape[1] != self.num_windows or math.prod(e.shape[2:]) != self.embed_dim:
            raise ValueError(f'{name} must be [B, {self.num_windows}, *e] with prod(e) = {self.embed_dim}, '
                             f'got {tuple(e.shape)}')
        return F.normalize(e.flatten(2).float(), dim=2)

    @torch.no_grad()
    def enqueue(self, teacher: torch.Tensor) -> None:
        """Push the normalised teacher window embeddings ``[B, P, *e]`` (one bank row per image)."""
        e_t = self._flatten(teacher.detach(), 'teacher')
        self.bank.push(e_t.flatten(1))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, tau_s: Optional[float] = None,
                tau_t: Optional[float] = None, enqueue: bool = True) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f'student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}')
        tau_s = self.tau_s if tau_s is None else _check_tau('tau_s', tau_s)
        tau_t = self.tau_t if tau_t is None else _check_tau('tau_t', tau_t)
        self._flatten(student, 'student')                                           # shape check, cheap
        if len(self.bank) == 0:
            loss = student.sum(dtype=torch.float32) * 0  # float32 sum: a half one overflows to inf, inf * 0 = NaN
        else:
            with torch.autocast(device_type=student.device.type, enabled=False):       # float32 logits
                e_s = self._flatten(student, 'student')                                 # [B, P, E]
                bank = self.bank.get().float().view(-1, self.num_windows, self.embed_dim)   # [K', P, E]
                equation = 'bpe,kpe->bpk' if self.anchors == 'same_window' else 'bpe,kqe->bpkq'
                with torch.no_grad():
                    e_t = self._flatten(teacher.detach(), 'teacher')
                    teacher_logits = torch.einsum(equation, e_t, bank).flatten(2) / tau_t
                student_logits = torch.einsum(equation, e_s, bank).flatten(2) / tau_s
                loss = relational_kl(student_logits, teacher_logits)
        if enqueue:
            self.enqueue(teacher)
        return loss


__all__ = ['GlobalDistillationLoss', 'LocalDistillationLoss', 'LocalProjectionHead', 'LocalPredictionHead',
           'relational_kl', 'window_starts', 'window_slices', 'num_windows', 'pool_windows']
