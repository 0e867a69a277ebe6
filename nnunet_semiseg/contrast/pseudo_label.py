"""Confidence-weighted pseudo-label cross-entropy (the ``L_unsup`` of ACTION, from ReCo; MONA uses the same term),
and small helpers to turn teacher logits into pseudo-labels. Spec ``action.md`` §2.4."""
from typing import Tuple

import torch
import torch.nn.functional as F


@torch.no_grad()
def pseudo_labels(teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``teacher_logits [B, C, *spatial]`` -> ``(probs [B, C, *spatial] float32, labels [B, *spatial] long,
    confidence [B, *spatial] float32)`` with ``labels = argmax``, ``confidence = max`` of the softmax. No gradient."""
    probs = torch.softmax(teacher_logits.float(), dim=1)
    confidence, labels = probs.max(dim=1)
    return probs, labels, confidence


def entropy(probs: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """Shannon entropy ``-sum p log p`` (nats) along ``dim``: ``[B, C, *spatial] -> [B, *spatial]`` float32."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=dim)


def unsup_pseudo_label_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor,
                            threshold: float = 0.97, ignore_index: int = -1) -> torch.Tensor:
    """Confidence-weighted cross-entropy on pseudo-labels (ACTION / ReCo ``L_unsup``).

    Per image ``b``, ``w_b = #{pixels with confidence >= threshold} / #{pixels with label != ignore_index}``; the loss
    is the mean of ``w_b * CE(logits, pseudo_labels)`` over the pixels whose CE is ``> 0`` (ignored pixels have CE
    0, so they drop out, as in the released code). When every pixel is confident it is the plain mean CE; when half
    are, half of it. Returns ``logits.sum() * 0`` when no pixel has a positive CE. Computed in float32.

    Args:
        logits: ``[B, C, *spatial]``, the student's logits on the (strongly augmented, mixed) unlabelled view.
        pseudo_labels: ``[B, *spatial]`` long, the teacher argmax (mixed with the same mask as the image).
        confidence: ``[B, *spatial]``, the teacher max-probability (mixed with the same mask).
        threshold: confidence needed to count towards ``w_b`` (0.97).
        ignore_index: label value that is ignored (-1).

    Raises:
        ValueError: shapes that disagree, or ``threshold`` outside ``(0, 1]``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f'threshold must be in (0, 1], got {threshold}')
    if pseudo_labels.shape != logits.shape[:1] + logits.shape[2:] or confidence.shape != pseudo_labels.shape:
        raise ValueError(f'logits [B, C, *spatial], pseudo_labels and confidence [B, *spatial] disagree: '
                         f'{tuple(logits.shape)}, {tuple(pseudo_labels.shape)}, {tuple(confidence.shape)}')
    batch = logits.shape[0]
    labels = pseudo_labels.long()
    with torch.no_grad():
        n_valid = (labels != ignore_index).reshape(batch, -1).sum(1).clamp_min(1)
        weight = (confidence.detach() >= threshold).reshape(batch, -1).sum(1).float() / n_valid.float()   # [B]
    ce = F.cross_entropy(logits.float(), labels, reduction='none', ignore_index=ignore_index)             # [B, *]
    positive = ce > 0
    if not bool(positive.any()):
        return logits.sum(dtype=torch.float32) * 0  # float32 sum: a half one overflows to inf, inf * 0 = NaN
    weighted = ce * weight.view(batch, *([1] * (ce.ndim - 1)))
    return weighted[positive].mean()


__all__ = ['unsup_pseudo_label_loss', 'pseudo_labels', 'entropy']
