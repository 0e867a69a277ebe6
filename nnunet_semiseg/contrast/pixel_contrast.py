"""Pixel/voxel contrastive loss of MONA and ARCO ("anatomical contrast", spec ``arco_mona.md`` §3), with the
entropy-percentile reliability masks it uses.

MONA and ARCO share this loss; they differ only in how anchors (and negatives) are sampled: MONA = naive
sampling, ARCO-SG / ARCO-SAG = stratified (antithetic) spatial sampling from :mod:`nnunet_semiseg.sampling`.
"""
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semiseg.heads import RepresentationMap

from .memory import FeatureQueue

SamplerFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def entropy_alpha(epoch: float, max_epoch: float, alpha0: float = 20.0) -> float:
    """The entropy-percentile schedule of U2PL / MONA: ``alpha_t = alpha0 * (1 - epoch / max_epoch)``, in percent,
    clipped to ``[0, alpha0]`` (20 -> 0 over training)."""
    if max_epoch <= 0:
        raise ValueError(f'max_epoch must be > 0, got {max_epoch}')
    if alpha0 < 0 or alpha0 > 50:
        raise ValueError(f'alpha0 must be in [0, 50] percent, got {alpha0}')
    return float(min(max(alpha0 * (1.0 - epoch / max_epoch), 0.0), alpha0))


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, q)`` (linear interpolation) for a 1-D tensor of any length (``torch.quantile``
    refuses inputs above 2**24 elements)."""
    n = values.numel()
    pos = q / 100.0 * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    v_lo = values.kthvalue(lo + 1).values
    if frac == 0.0 or lo + 1 >= n:
        return v_lo
    v_hi = values.kthvalue(lo + 2).values
    return v_lo + frac * (v_hi - v_lo)


@torch.no_grad()
def entropy_masks(probs: torch.Tensor, alpha_percent: float,
                  valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entropy-percentile reliability masks of U2PL, used by MONA/ARCO for unlabelled images.

    ``low`` (reliable) = entropy <= the ``alpha_percent``-th percentile, ``high`` (unreliable) = entropy >= the
    ``(100 - alpha_percent)``-th percentile, percentiles taken over the valid pixels of the whole batch. With
    ``alpha_percent = entropy_alpha(epoch, max_epoch)`` (20 -> 0), the reliable set shrinks over training.

    Which probabilities to pass is the caller's choice: the teacher's (U2PL; our default) or the student's (the
    released MONA/ARCO code, spec §7 B12). Labelled images use all-True masks instead (the trainer concatenates).

    Args:
        probs: ``[B, C, *spatial]`` float, softmax probabilities.
        alpha_percent: in ``[0, 50]``.
        valid: optional ``[B, *spatial]`` bool; invalid pixels are in neither mask and not in the percentiles.

    Returns:
        ``(low_mask, high_mask)``, each ``[B, *spatial]`` bool (all False if no pixel is valid).
    """
    if not 0.0 <= alpha_percent <= 50.0:
        raise ValueError(f'alpha_percent must be in [0, 50], got {alpha_percent}')
    if probs.ndim < 3:
        raise ValueError(f'entropy_masks expects probs [B, C, *spatial], got {tuple(probs.shape)}')
    p = probs.float()
    entropy = -(p * torch.log(p + 1e-10)).sum(1)
    if valid is None:
        valid = torch.ones_like(entropy, dtype=torch.bool)
    elif valid.shape != entropy.shape:
        raise ValueError(f'valid must have shape {tuple(entropy.shape)}, got {tuple(valid.shape)}')
    values = entropy[valid]
    if values.numel() == 0:
        return valid.clone(), valid.clone()
    low = (entropy <= _percentile(values, alpha_percent)) & valid
    high = (entropy >= _percentile(values, 100.0 - alpha_percent)) & valid
    return low, high


def resize_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest resize of ``[B, *spatial]`` (labels, masks) or ``[B, C, *spatial]`` (probabilities) to ``size``."""
    has_channels = x.ndim == len(size) + 2
    y = x if has_channels else x.unsqueeze(1)
    y = F.interpolate(y.float(), size=tuple(size), mode='nearest').to(x.dtype)
    return y if has_channels else y.squeeze(1)


def _randint(high: int, n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=gdev).to(device)


def _normalize_rows_(rows: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(rows, dim=1)`` written into ``rows`` (``[N, D]`` or ``[B, D, P]``, a tensor the caller owns): the
    same operations, so the same values, without a second table of its size (up to 15 MB a class per bank push)."""
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(eps))


def _randperm(n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gdev).to(device)


class PixelContrastLoss(nn.Module):
    """Class-balanced pixel/voxel contrastive loss of MONA (You et al., arXiv 2209.13476) and ARCO (You et al.,
    NeurIPS 2023, arXiv 2302.01735), in the form both papers write (ARCO App. E, Eq. E.2-E.3; ReCo-like).

    For every class ``c`` present in the batch, ``num_queries`` anchors are drawn from the student reps at
    ``label == c & low_mask & p_c > anchor_threshold`` with the chosen sampler, *per class*, so that tail
    classes weigh as much as background ("tailness"). Each anchor is contrasted, by cosine similarity / tau,
    against one positive, the class prototype (mean teacher rep over ``label == c & low_mask``, detached), and
    ``num_negatives`` teacher reps of other classes; the loss is the cross-entropy with target "positive",
    averaged over the anchors of a class with the sampler's importance weights (unbiased for the mean over all
    candidates, spec §4.2) and then over the classes that produced anchors. Gradients reach only the student
    reps of the anchors.

    Negatives (``negative_mode``):

    * ``'paper'``: current-batch teacher reps at ``label >= 0 & label != c & low_mask``, ``num_queries *
      num_negatives`` of them drawn with the anchor sampler (or naive: ``sample_negatives_with='naive'``); the
      sampler weights enter the softmax denominator as ``log w`` so that it estimates the full sum (the draws
      are shuffled before they are dealt out to the anchors, so every anchor's negatives span all strata).
    * ``'bank'`` (spec ``u2pl_fixed``, default): a per-class FIFO bank (:class:`FeatureQueue`, GPU buffers) of
      L2-normalised teacher reps of U2PL's *intended* hard negatives, pushed before sampling each step
      (at most ``bank_size`` per class and step, a uniform random subset when there are more):
      labelled pixels with ``label != c`` and ``c`` in the teacher's top ``low_rank``; unlabelled pixels in
      ``high_mask`` with teacher rank of ``c`` in ``[low_rank, high_rank)`` and ``label != c``; both with
      ``p_c < negative_threshold``. Negatives are drawn uniformly from the bank (its index is age, not space).
      While a class's bank is empty its negatives come from the ``'paper'`` rule. This fixes the released code's
      bank, which stays empty (spec §7 B1, U2PL #171) and indexes classes inconsistently (B3, U2PL #111): here
      everything is indexed by the true class id.

    Classes absent from the batch are skipped; fewer than two valid classes (classes with at least one pixel
    at ``label == c & low_mask``, background included) gives ``0`` attached to the graph. Logits are computed in
    float32 with autocast disabled.

    Args:
        num_classes: C, including background (>= 2).
        num_queries: anchors per class and step (256).
        num_negatives: negatives per anchor (512).
        temperature: tau of the cosine logits (0.5).
        anchor_threshold: delta_p, anchors need teacher ``p_c >`` this (0.3).
        negative_mode: ``'bank'`` (default) or ``'paper'``.
        rep_dim: D, width of the reps; required for ``'bank'`` (the banks are module buffers).
        bank_size: entries per class bank (30000).
        negative_threshold: delta_n, bank negatives need ``p_c <`` this (0.97).
        low_rank: r_l (default ``min(3, C - 1)``, so binary tasks get 1, U2PL #17).
        high_rank: r_h (default ``C``).
        include_background: let class 0 produce anchors (True, as the code). Class 0 always counts as valid
            and always serves as a negative.
        sampler: ``'naive'`` (MONA), ``'sg'`` or ``'sag'`` (ARCO), passed to
            :func:`nnunet_semiseg.sampling.sample`; or a callable ``fn(mask, n, generator=g) -> (indices,
            weights)`` with the same contract.
        grid: strata grid for the sampler (None: the sampler's default, 4x4 / 4x4x2).
        sample_negatives_with: ``'same'`` (the anchor sampler; the code) or ``'naive'``, for batch negatives.

    Shapes (forward):
        student_reps: ``[B, D, *sp]`` float, student ``P_q(F_q(.))`` output (gradient flows here), or a
            :class:`~nnunet_semiseg.heads.RepresentationMap` of it, which is then read at the anchors only.
        teacher_reps: ``[B, D, *sp]`` float, teacher ``F_k(.)`` output on the same input (detached here).
        labels: ``[B, *sp_l]`` long, ground truth for labelled images, pseudo-labels for unlabelled, -1 = ignore.
        teacher_probs: ``[B, C, *sp_l]`` float, teacher softmax on the same input.
        low_mask, high_mask: ``[B, *sp_l]`` bool reliability masks (None = all True; all True for labelled).
        is_labeled: ``[B]`` bool, which images are labelled; required for ``'bank'``.
        generator: optional ``torch.Generator`` for every random draw.
        ``sp_l`` may differ from ``sp`` (full-resolution labels, reduced-resolution reps): labels, probabilities
        and masks are then nearest-resized to ``sp``.
        Returns a scalar float32 tensor.

    Buffers: in ``'bank'`` mode ``banks.<c>.{feats, labels, ptr, count}`` (``bank_size x rep_dim`` per class);
    they belong in the checkpoint (``state_dict``). forward pushes to them; no other side effect.

    Raises:
        ValueError: invalid arguments (naming the value), wrong input shapes, labels >= C, ``'bank'`` without
            ``is_labeled``.
    """

    def __init__(self, num_classes: int, num_queries: int = 256, num_negatives: int = 512,
                 temperature: float = 0.5, anchor_threshold: float = 0.3, negative_mode: str = 'bank',
                 rep_dim: Optional[int] = None, bank_size: int = 30000, negative_threshold: float = 0.97,
                 low_rank: Optional[int] = None, high_rank: Optional[int] = None, include_background: bool = True,
                 sampler: Union[str, SamplerFn] = 'naive', grid: Optional[Sequence[int]] = None,
                 sample_negatives_with: str = 'same'):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2 (background included), got {num_classes}')
        if num_queries < 1:
            raise ValueError(f'num_queries must be >= 1, got {num_queries}')
        if num_negatives < 1:
            raise ValueError(f'num_negatives must be >= 1, got {num_negatives}')
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        if not 0.0 <= anchor_threshold < 1.0:
            raise ValueError(f'anchor_threshold must be in [0, 1), got {anchor_threshold}')
        if negative_mode not in ('paper', 'bank'):
            raise ValueError(f"negative_mode must be 'paper' or 'bank', got {negative_mode!r}")
        if not callable(sampler) and sampler not in ('naive', 'sg', 'sag'):
            raise ValueError(f"sampler must be 'naive', 'sg', 'sag' or a callable, got {sampler!r}")
        if sample_negatives_with not in ('same', 'naive'):
            raise ValueError(f"sample_negatives_with must be 'same' or 'naive', got {sample_negatives_with!r}")
        self.low_rank = min(3, num_classes - 1) if low_rank is None else int(low_rank)
        self.high_rank = num_classes if high_rank is None else int(high_rank)
        if not 1 <= self.low_rank < self.high_rank <= num_classes:
            raise ValueError(f'need 1 <= low_rank < high_rank <= num_classes, got low_rank={self.low_rank}, '
                             f'high_rank={self.high_rank}, num_classes={num_classes}')
        if not 0.0 < negative_threshold <= 1.0:
            raise ValueError(f'negative_threshold must be in (0, 1], got {negative_threshold}')
        self.num_classes, self.num_queries, self.num_negatives = int(num_classes), int(num_queries), int(num_negatives)
        self.temperature, self.anchor_threshold = float(temperature), float(anchor_threshold)
        self.negative_mode, self.negative_threshold = negative_mode, float(negative_threshold)
        self.include_background = bool(include_background)
        self.sampler, self.grid, self.sample_negatives_with = sampler, grid, sample_negatives_with
        self.rep_dim = rep_dim
        if negative_mode == 'bank':
            if rep_dim is None or rep_dim <= 0:
                raise ValueError(f"negative_mode='bank' needs rep_dim > 0, got rep_dim={rep_dim}")
            if bank_size <= 0:
                raise ValueError(f'bank_size must be > 0, got {bank_size}')
            self.banks = nn.ModuleList([FeatureQueue(bank_size, rep_dim) for _ in range(num_classes)])
        self.bank_size = int(bank_size)

    # ------------------------------------------------------------------------------------------------------
    def _draw(self, mask: torch.Tensor, n: int, which, generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` indices into ``mask.nonzero()`` order and their weights, with sampler ``which``."""
        if callable(which):
            idx, w = which(mask, n, generator=generator)
        else:
            from nnunet_semiseg.sampling import sample  # lazy: the sampler module is optional at import time
            idx, w = sample(mask, n, which, grid=self.grid, generator=generator)
        return idx.to(mask.device, torch.long), w.to(mask.device, torch.float32)

    def _check(self, student_reps, teacher_reps, labels, teacher_probs, low_mask, high_mask, is_labeled):
        if student_reps.ndim < 3:
            raise ValueError(f'student_reps must be [B, D, *spatial], got {tuple(student_reps.shape)}')
        if teacher_reps.shape != student_reps.shape:
            raise ValueError(f'teacher_reps {tuple(teacher_reps.shape)} must match student_reps '
                             f'{tuple(student_reps.shape)}')
        if self.rep_dim is not None and student_reps.shape[1] != self.rep_dim:
            raise ValueError(f'reps have D={student_reps.shape[1]}, the loss was built with rep_dim={self.rep_dim}')
        b, nd = student_reps.shape[0], student_reps.ndim - 2
        if labels.ndim != nd + 1 or labels.shape[0] != b:
            raise ValueError(f'labels must be [B={b}, *spatial] with {nd} spatial dims, got {tuple(labels.shape)}')
        if teacher_probs.shape != (b, self.num_classes) + tuple(labels.shape[1:]):
            raise ValueError(f'teacher_probs must be {(b, self.num_classes) + tuple(labels.shape[1:])}, '
                             f'got {tuple(teacher_probs.shape)}')
        for name, m in (('low_mask', low_mask), ('high_mask', high_mask)):
            if m is not None and m.shape != labels.shape:
                raise ValueError(f'{name} must have the labels shape {tuple(labels.shape)}, got {tuple(m.shape)}')
        if self.negative_mode == 'bank' and (is_labeled is None or is_labeled.shape != (b,)):
            raise ValueError(f"negative_mode='bank' needs is_labeled as a [B={b}] bool tensor, got "
                             f"{None if is_labeled is None else tuple(is_labeled.shape)}")

    def forward(self, student_reps: torch.Tensor, teacher_reps: torch.Tensor, labels: torch.Tensor,
                teacher_probs: torch.Tensor, low_mask: Optional[torch.Tensor] = None,
                high_mask: Optional[torch.Tensor] = None, is_labeled: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self._check(student_reps, teacher_reps, labels, teacher_probs, low_mask, high_mask, is_labeled)
        device = student_reps.device
        b, d, sp = student_reps.shape[0], student_reps.shape[1], tuple(student_reps.shape[2:])
        labels = labels.to(device, torch.long)
        low_mask = torch.ones_like(labels, dtype=torch.bool) if low_mask is None else low_mask.to(device, torch.bool)
        high_mask = torch.ones_like(labels, dtype=torch.bool) if high_mask is None else high_mask.to(device, torch.bool)
        probs = teacher_probs.detach().to(device)
        if tuple(labels.shape[1:]) != sp:
            labels, low_mask, high_mask, probs = (resize_nearest(x, sp) for x in (labels, low_mask, high_mask, probs))
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f'labels must be < num_classes={self.num_classes}, got max {int(labels.max())}')
        if isinstance(student_reps, RepresentationMap):  # evaluated at the anchors only
            zero, read_student = student_reps.zero(), lambda flat: student_reps.at(flat).float()
        else:
            zero = student_reps.sum(dtype=torch.float32) * 0.0  # float32: a half sum overflows to inf, inf * 0 = NaN
            s3 = student_reps.reshape(b, d, -1)                  # [B, D, P] view, gathered per position
            read_student = lambda flat: s3[flat // s3.shape[2], :, flat % s3.shape[2]].float()
        valid = labels >= 0
        present = torch.bincount(labels[valid & low_mask], minlength=self.num_classes) > 0
        if int(present.sum()) < 2:
            return zero.float()

        with torch.autocast(device_type=device.type, enabled=False):
            t3 = teacher_reps.detach().reshape(b, d, -1)
            # teacher reps by flat position, [B*P, D] (a view of a channels-last map)
            teacher_rows = t3.transpose(1, 2).reshape(-1, d)
            probs = probs.reshape(b, self.num_classes, -1).float()
            lab, low, high = labels.reshape(b, -1), low_mask.reshape(b, -1), high_mask.reshape(b, -1)
            teacher_unit = None

            def teacher_table():  # the rows L2-normalised, float32, made once (only while a bank is empty)
                nonlocal teacher_unit
                if teacher_unit is None:
                    teacher_unit = F.normalize(teacher_rows.float(), dim=1)
                return teacher_unit

            def positions(mask2):  # [B, P] bool -> flat positions in mask.nonzero() (raster) order
                return mask2.reshape(-1).nonzero().squeeze(1)

            anchor_classes = [c for c in range(self.num_classes) if c > 0 or self.include_background]
            # class prototypes (positives): mean teacher rep over label == c & low_mask, all classes in one pass
            member = F.one_hot(lab.clamp_min(0), self.num_classes).float() * (valid.reshape(b, -1) & low)[..., None]
            protos = torch.bmm(t3.float(), member).sum(0).T / member.sum((0, 1)).clamp_min(1.0)[:, None]
            protos = F.normalize(protos, dim=1)                                                # [C, D]
            if self.negative_mode == 'bank':
                # normalised only where pushed, not the whole table
                self._push_negatives(lambda flat: _normalize_rows_(teacher_rows.index_select(0, flat).float()),
                                     positions, lab, high, probs, is_labeled.to(device, torch.bool), anchor_classes,
                                     generator)

            # draw every class's anchors and negatives first (in the order the random streams expect), then read
            # the student at all anchors at once
            drawn = []
            for c in anchor_classes:
                if not bool(present[c]):
                    continue
                valid_c = (lab == c) & low
                anchor_mask = valid_c & (probs[:, c] > self.anchor_threshold)
                if not bool(anchor_mask.any()):
                    continue
                idx_a, w_a = self._draw(anchor_mask.view(b, *sp), self.num_queries, self.sampler, generator)
                negatives = self._negatives(c, teacher_table, positions, lab, low, b, sp, generator)
                drawn.append((c, positions(anchor_mask)[idx_a], w_a, negatives))
            if not drawn:
                return zero.float()
            all_anchors = F.normalize(read_student(torch.cat([a for _, a, _, _ in drawn])), dim=1)
            losses = []
            for (c, _, w_a, (table, index, neg_logw)), anchors in zip(drawn, all_anchors.split(self.num_queries)):
                pos_logit = anchors @ protos[c] / self.temperature                                  # [nq]
                neg_logits = dots_with_rows(anchors, table, index) / self.temperature + neg_logw
                logits = torch.cat((pos_logit[:, None], neg_logits), dim=1)                    # [nq, 1 + K]
                ce = torch.logsumexp(logits, dim=1) - pos_logit
                losses.append((w_a * ce).sum() / self.num_queries)
            return torch.stack(losses).mean()

    @torch.no_grad()
    def _push_negatives(self, teacher_rows, positions, lab, high, probs, is_labeled, classes, generator):
        """Push U2PL's intended hard negatives of every class ``c`` (teacher reps, L2-normalised: ``teacher_rows(flat)``
        gives them at flat positions) to bank ``c``."""
        lab_img = is_labeled[:, None]
        for c in classes:
            p_c = probs[:, c]
            rank_c = (probs > p_c[:, None]).sum(1)             # 0 = teacher's top class
            base = (lab >= 0) & (lab != c) & (p_c < self.negative_threshold)
            neg = base & torch.where(lab_img, rank_c < self.low_rank,
                                     high & (rank_c >= self.low_rank) & (rank_c < self.high_rank))
            flat = positions(neg)
            if flat.numel() == 0:
                continue
            if flat.numel() > self.bank_size:
                flat = flat[_randperm(flat.numel(), generator, flat.device)[:self.bank_size]]
            self.banks[c].push(teacher_rows(flat))

    def _negatives(self, c, teacher_table, positions, lab, low, b, sp, generator):
        """``num_queries x num_negatives`` negatives for class ``c`` as rows of a table: ``(table [M, D] float32 unit,
        index [nq, K] long, log w [nq, K])``, negative ``(q, k)`` being ``table[index[q, k]]``."""
        nq, k = self.num_queries, self.num_negatives
        if self.negative_mode == 'bank' and len(self.banks[c]) > 0:
            bank = self.banks[c]
            m = len(bank)
            idx = _randint(m, nq * k, generator, bank.feats.device)      # positions in bank.get()'s (age) order
            if m == bank.size:  # full ring: get() starts at the write pointer
                idx = (idx + int(bank.ptr)) % bank.size
            # the bank's own storage, not a copy (4 x 15 MB at the defaults, held until the backward): the next push
            # comes with the next step's forward, and autograd's version check would refuse a backward after one
            table = bank.feats[:m].float()
            return table, idx.view(nq, k), torch.zeros(nq, k, device=table.device)
        neg_mask = (lab >= 0) & (lab != c) & low
        which = self.sampler if self.sample_negatives_with == 'same' else 'naive'
        idx, w = self._draw(neg_mask.view(b, *sp), nq * k, which, generator)
        if which != 'naive':  # stratified draws come grouped by stratum: shuffle so each anchor sees all strata
            perm = _randperm(idx.numel(), generator, idx.device)
            idx, w = idx[perm], w[perm]
        return teacher_table(), positions(neg_mask)[idx].view(nq, k), torch.log(w.clamp_min(1e-12)).view(nq, k)


def dots_with_rows(queries: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[q, k] = queries[q] . table[index[q, k]]`` (``[Q, D]``, ``[M, D]``, ``[Q, K]`` long -> ``[Q, K]``), with
    gradient to ``queries`` only. For a table that is small against the ``Q * K`` rows read (a negative bank) all
    ``Q x M`` products are one matrix product, cheaper than copying ``Q * K`` rows out; otherwise the rows are
    gathered (``index_select``, about twice as fast as advanced indexing for rows). The two are the same sums in a
    different order. Either way the backward keeps only ``table`` and ``index``, never the ``[Q, M]`` products or
    the ``[Q, K, D]`` rows (67 MB a class at 256 x 512 x 128)."""
    table = table.detach()
    if table.shape[0] * 4 <= index.numel():
        return _ProductsAtIndex.apply(queries, table, index)
    return _RowsAtIndex.apply(queries, table, index)


_CHUNK_BYTES = 8 * 2 ** 20   # the [q, M] products or [q, K, D] rows made at a time (whole: 30-67 MB a class)


def _query_chunks(num_queries: int, row_bytes: int):
    """Slices of the queries whose products (or gathered rows) take about ``_CHUNK_BYTES``: each query's result
    depends on its own row only, so the chunks give the whole computation's values, at a fraction of its memory."""
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    return [slice(i, min(i + step, num_queries)) for i in range(0, num_queries, step)]


class _ProductsAtIndex(torch.autograd.Function):
    """``(queries @ table.T).gather(1, index)`` with autograd's own backward (``scatter_add`` into zeros, then the
    product with ``table``), but without keeping the ``[Q, M]`` products for it: ``gather`` saves its whole input
    (30 MB a class for 256 queries against a bank of 30 000), this saves ``table`` (the bank itself) and ``index``.
    Forward and backward run over chunks of queries, so neither makes the whole ``[Q, M]`` at once."""

    @staticmethod
    def forward(ctx, queries, table, index):
        ctx.save_for_backward(table, index)
        out = queries.new_empty(index.shape)
        for q in _query_chunks(queries.shape[0], table.shape[0] * queries.element_size()):
            out[q] = (queries[q] @ table.T).gather(1, index[q])
        return out

    @staticmethod
    def backward(ctx, grad):
        table, index = ctx.saved_tensors
        out = grad.new_empty(grad.shape[0], table.shape[1])
        for q in _query_chunks(grad.shape[0], table.shape[0] * grad.element_size()):
            out[q] = grad.new_zeros(out[q].shape[0], table.shape[0]).scatter_add_(1, index[q], grad[q]) @ table
        return out, None, None


class _RowsAtIndex(torch.autograd.Function):
    """``einsum('qd,qkd->qk', queries, table[index])`` whose backward gathers the rows again instead of keeping them:
    ``grad_queries[q] = sum_k grad[q, k] table[index[q, k]]``, the same product autograd forms from kept rows.
    Both gather the rows of a chunk of queries at a time (the whole ``[Q, K, D]``: 67 MB at 256 x 512 x 128)."""

    @staticmethod
    def forward(ctx, queries, table, index):
        ctx.save_for_backward(table, index)
        out = queries.new_empty(index.shape)
        for q in _query_chunks(queries.shape[0], index.shape[1] * table.shape[1] * table.element_size()):
            rows = table.index_select(0, index[q].flatten()).view(*index[q].shape, -1)
            out[q] = torch.einsum('qd,qkd->qk', queries[q], rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        table, index = ctx.saved_tensors
        out = grad.new_empty(grad.shape[0], table.shape[1])
        for q in _query_chunks(grad.shape[0], index.shape[1] * table.shape[1] * table.element_size()):
            rows = table.index_select(0, index[q].flatten()).view(*index[q].shape, -1)
            out[q] = torch.einsum('qk,qkd->qd', grad[q], rows)
        return out, None, None
