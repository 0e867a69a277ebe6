"""MONA's fine-tuning terms besides the pixel contrast (spec ``arco_mona.md`` §5): the nearest-neighbour loss
``L_nn`` (diversity), the equivariance loss ``L_eqv`` (consistency) and, re-exported from
:mod:`~nnunet_semiseg.contrast.pseudo_label`, the confidence-weighted pseudo-label loss ``L_unsup``.

MONA's pre-training relational terms (global instance discrimination on bottleneck embeddings, local on
patch-pooled output maps) are ISD-style relational KL distillation, the same as ACTION's global/local
distillation: the trainer reuses :mod:`nnunet_semiseg.contrast.distillation` for them.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .memory import FeatureQueue
from .pseudo_label import unsup_pseudo_label_loss

# L_unsup (spec §5.5) is ReCo's confidence-weighted pseudo-label CE, the same term ACTION uses: one
# implementation, in :mod:`nnunet_semiseg.contrast.pseudo_label`, re-exported here under MONA's name.
confidence_weighted_ce = unsup_pseudo_label_loss

__all__ = ['NearestNeighbourLoss', 'EquivarianceLoss', 'confidence_weighted_ce', 'unsup_pseudo_label_loss']


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool ``[B, D, *spatial] -> [B, D]`` float32 (accumulated in float32, no float32 copy of
    the map); ``[B, D]`` is only cast."""
    return x.flatten(2).mean(-1, dtype=torch.float32) if x.ndim > 2 else x.float()


class NearestNeighbourLoss(nn.Module):
    """Nearest-neighbour positive loss ``L_nn`` of MONA ("diversity"), in the mean-shift (MSF, Koohpayegani et
    al. 2021) form the released code intended (spec §5.4).

    Both representation maps are globally average-pooled and L2-normalised (``s`` student, ``t`` teacher). The
    ``topk`` nearest neighbours of each image are chosen in a FIFO bank of past teacher embeddings by the
    **teacher** embedding, and the loss is the mean squared distance ``2 - 2 cos(s, bank_j)`` from the **student**
    embedding to them, so it has a gradient. The released code swaps the roles (neighbours by the student,
    distances from the teacher), which makes the term a constant (spec §7 B2). Its bank also held whole
    full-resolution maps (gigabytes, B14); here it holds pooled D-vectors.

    Args:
        dim: D, width of the representation maps (bank buffer width).
        bank_size: K, number of past teacher embeddings kept (36).
        topk: neighbours per image (5; fewer while the bank holds fewer).
        include_target: also offer the current teacher embedding as a neighbour candidate (MSF does; the
            MONA code does not; default False).

    Shapes:
        forward(student_reps ``[B, D, *sp]`` or ``[B, D]`` float (grad), teacher_reps same shape (no grad),
        enqueue=True) -> scalar float32. ``0`` attached to the graph while the bank is empty.

    Buffers: ``bank.{feats, labels, ptr, count}`` (``bank_size x dim``); save them in the checkpoint. forward
    pushes the teacher embeddings *after* computing the loss (unless ``enqueue=False``).
    """

    def __init__(self, dim: int, bank_size: int = 36, topk: int = 5, include_target: bool = False):
        super().__init__()
        if topk < 1:
            raise ValueError(f'topk must be >= 1, got {topk}')
        if bank_size < 1:
            raise ValueError(f'bank_size must be >= 1, got {bank_size}')
        self.topk, self.include_target = int(topk), bool(include_target)
        self.bank = FeatureQueue(bank_size, dim)

    def forward(self, student_reps: torch.Tensor, teacher_reps: torch.Tensor, enqueue: bool = True) -> torch.Tensor:
        if student_reps.shape != teacher_reps.shape or student_reps.shape[1] != self.bank.dim:
            raise ValueError(f'NearestNeighbourLoss expects student and teacher reps [B, {self.bank.dim}, *sp] of '
                             f'equal shape, got {tuple(student_reps.shape)} and {tuple(teacher_reps.shape)}')
        with torch.autocast(device_type=student_reps.device.type, enabled=False):
            s = F.normalize(_pool(student_reps).float(), dim=1)                  # [B, D]
            t = F.normalize(_pool(teacher_reps.detach()).float(), dim=1)         # [B, D]
            if len(self.bank) == 0 and not self.include_target:
                # float32 sum: a half one overflows to inf, inf * 0 = NaN
                loss = student_reps.sum(dtype=torch.float32) * 0.0
            else:
                keys = self.bank.get().to(s.device, s.dtype)                     # [M, D]
                if self.include_target:  # candidate j = 0 is the image's own teacher embedding
                    sim_t = torch.cat(((t * t).sum(1, keepdim=True), t @ keys.T), dim=1)
                    sim_s = torch.cat(((s * t).sum(1, keepdim=True), s @ keys.T), dim=1)
                else:
                    sim_t, sim_s = t @ keys.T, s @ keys.T                        # [B, M(+1)]
                nn_idx = sim_t.topk(min(self.topk, sim_t.shape[1]), dim=1).indices  # teacher picks neighbours
                loss = (2.0 - 2.0 * sim_s.gather(1, nn_idx)).mean()              # student is pulled to them
        if enqueue:
            self.bank.push(t)
        return loss


class EquivarianceLoss(nn.Module):
    """Equivariance loss ``L_eqv`` of the MONA code (spec §5.6; not in the papers' text, optional term).

    A random geometric transform T (rotation, isotropic scale, translation, mirror; one T for the whole batch)
    should commute with the network: ``model(T(x)) ~ T(model(x))``. The loss is the per-pixel
    ``KL(softmax(T(model(x))) || softmax(model(T(x))))`` (target detached), summed over the pixels of
    ``T(mask)`` and divided by its size, where ``mask = foreground & confidence >= 0.7``
    (:meth:`confidence_mask`). The released code uses a thin-plate spline with the similarity part below; we use
    the affine part only (``F.affine_grid`` / ``F.grid_sample``), which works for 2D and 3D alike.

    Args:
        max_rotation_deg: rotation angle uniform in ``[-a, a]`` per rotation plane (1 plane in 2D, 3 in 3D) (60).
        scale_range: isotropic scale uniform in this range (0.8, 1.2).
        max_translation: shift per axis uniform in ``[-t, t]``, in normalised ``[-1, 1]`` units (0.1).
        flip_prob: probability of mirroring the last spatial axis (0.5).
        mask_threshold: confidence threshold of :meth:`confidence_mask` (0.7).

    Typical trainer step (``x`` the student's inputs, ``logits = student(x)``, ``conf`` teacher confidence, 1 on
    labelled images)::

        theta = eqv.make_transform(x.shape, generator)                           # [B, nd, nd + 1]
        mask = eqv.confidence_mask(labels, conf)                                 # [B, *sp] bool
        loss = eqv(student(eqv.warp(x, theta)), eqv.warp(logits.detach(), theta),
                   eqv.warp(mask, theta))
        # or: loss = eqv.from_model(student, x, logits, mask, generator)

    Shapes: forward(pred_logits ``[B, C, *sp]``, target_logits ``[B, C, *sp]``, mask ``[B, *sp]`` bool/float)
    -> scalar float32 (0 attached to ``pred_logits``' graph when the mask is empty).
    """

    def __init__(self, max_rotation_deg: float = 60.0, scale_range: Tuple[float, float] = (0.8, 1.2),
                 max_translation: float = 0.1, flip_prob: float = 0.5, mask_threshold: float = 0.7):
        super().__init__()
        if max_rotation_deg < 0:
            raise ValueError(f'max_rotation_deg must be >= 0, got {max_rotation_deg}')
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f'scale_range must satisfy 0 < low <= high, got {scale_range}')
        if max_translation < 0:
            raise ValueError(f'max_translation must be >= 0, got {max_translation}')
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f'flip_prob must be in [0, 1], got {flip_prob}')
        if not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f'mask_threshold must be in [0, 1], got {mask_threshold}')
        self.max_rotation, self.scale_range = math.radians(max_rotation_deg), tuple(scale_range)
        self.max_translation, self.flip_prob, self.mask_threshold = max_translation, flip_prob, mask_threshold

    def make_transform(self, batch_shape: Sequence[int], generator: Optional[torch.Generator] = None,
                       device: Optional[torch.device] = None) -> torch.Tensor:
        """A random affine ``theta [B, nd, nd + 1]`` float32 (the same for every image) for ``F.affine_grid``.

        ``batch_shape`` is the shape of the batch to warp, ``[B, C, *spatial]``; ``nd = len(spatial)``.
        Drawn with ``generator`` (on its device), returned on ``device`` (default: the generator's, else CPU).
        """
        b, nd = int(batch_shape[0]), len(batch_shape) - 2
        if nd < 1:
            raise ValueError(f'batch_shape must be [B, C, *spatial], got {tuple(batch_shape)}')
        gdev = generator.device if generator is not None else torch.device('cpu')
        planes = [(i, j) for i in range(nd) for j in range(i + 1, nd)]
        u = torch.rand(len(planes) + 2 + nd, generator=generator, device=gdev, dtype=torch.float64).cpu()
        a = torch.eye(nd, dtype=torch.float64)
        for (i, j), ui in zip(planes, u[:len(planes)]):  # compose one Givens rotation per plane
            ang = float((2 * ui - 1) * self.max_rotation)
            g = torch.eye(nd, dtype=torch.float64)
            g[i, i], g[i, j], g[j, i], g[j, j] = math.cos(ang), -math.sin(ang), math.sin(ang), math.cos(ang)
            a = g @ a
        lo, hi = self.scale_range
        a = a * (lo + (hi - lo) * float(u[len(planes)]))
        if float(u[len(planes) + 1]) < self.flip_prob:
            a[:, 0] = -a[:, 0]  # theta's first coordinate is the last spatial axis (x)
        shift = (2 * u[len(planes) + 2:] - 1) * self.max_translation
        theta = torch.cat((a, shift[:, None]), dim=1).float()
        return theta.unsqueeze(0).expand(b, nd, nd + 1).to(device if device is not None else gdev)

    @staticmethod
    def warp(x: torch.Tensor, theta: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """Resample ``x`` with ``theta`` (zero padding, ``align_corners=False``).

        ``x``: ``[B, C, *sp]`` float (mode default ``'bilinear'``, trilinear in 3D), or ``[B, *sp]`` bool / long
        (labels, masks: mode default ``'nearest'``, returned in the input dtype). Same shape out.
        """
        nd = theta.shape[1]
        if x.ndim not in (nd + 1, nd + 2) or x.shape[0] != theta.shape[0]:
            raise ValueError(f'warp expects [B={theta.shape[0]}, (C,) *{nd} spatial dims], got {tuple(x.shape)}')
        channel_less = x.ndim == nd + 1
        y = x.unsqueeze(1) if channel_less else x
        if mode is None:
            mode = 'bilinear' if x.is_floating_point() else 'nearest'
        # autocast would build the grid in half precision: sampling positions off by up to half a pixel
        with torch.autocast(device_type=y.device.type, enabled=False):
            grid = F.affine_grid(theta.to(y.device, torch.float32), list(y.shape), align_corners=False)
            out = F.grid_sample(y.float(), grid, mode=mode, padding_mode='zeros', align_corners=False)
        out = out.squeeze(1) if channel_less else out
        if x.dtype == torch.bool:
            return out > 0.5
        return out.round().to(x.dtype) if not x.is_floating_point() else out.to(x.dtype)

    def confidence_mask(self, labels: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """``(labels > 0) & (confidence >= mask_threshold)``: foreground pixels the target is trusted on
        (``[B, *sp]`` long and float -> ``[B, *sp]`` bool; pass confidence 1 for labelled images)."""
        return (labels > 0) & (confidence >= self.mask_threshold)

    def forward(self, pred_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred_logits.shape != target_logits.shape or mask.shape != pred_logits.shape[:1] + pred_logits.shape[2:]:
            raise ValueError(f'expected pred/target logits [B, C, *sp] and mask [B, *sp], got '
                             f'{tuple(pred_logits.shape)}, {tuple(target_logits.shape)}, {tuple(mask.shape)}')
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            m = mask.float()
            denom = m.sum()
            if float(denom) == 0.0:
                # float32 sum: a half one overflows to inf, inf * 0 = NaN
                return pred_logits.sum(dtype=torch.float32) * 0.0
            log_p_target = F.log_softmax(target_logits.detach().float(), dim=1)
            log_p_pred = F.log_softmax(pred_logits.float(), dim=1)
            kl = (log_p_target.exp() * (log_p_target - log_p_pred)).sum(1)        # [B, *sp]
            return (kl * m).sum() / denom

    def from_model(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, logits: torch.Tensor,
                   mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw T, run ``model`` on ``T(x)`` and compare with ``T(logits)`` (detached) under ``T(mask)``.

        ``model(x) -> [B, C, *sp]`` logits (pick the full-resolution output of a deep-supervision list in the
        callable); ``x [B, C_in, *sp]``, ``logits [B, C, *sp]`` = model's logits on ``x``, ``mask [B, *sp]`` bool.
        """
        theta = self.make_transform(x.shape, generator, device=x.device)
        return self(model(self.warp(x, theta)), self.warp(logits.detach(), theta), self.warp(mask, theta))
