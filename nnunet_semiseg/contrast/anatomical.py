"""ACTION's anatomical contrast (AnCo): a supervised pixel-to-prototype contrast with class-aware hard negatives.

ACTION (You et al., IPMI 2023, arXiv 2206.02307) fine-tunes with the regional contrast of ReCo (Liu et al.,
ICLR 2022): hard pixels (low student confidence in their (pseudo)label) are pulled to their class prototype and
pushed from negatives drawn more often from the classes whose prototypes are most similar to theirs. Spec:
``action.md`` §2.3; the defaults are the paper's and the code's (they agree).
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semiseg.contrast.pixel_contrast import _normalize_rows_, dots_with_rows
from nnunet_semiseg.heads import RepresentationMap

QuerySampler = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def uniform_query_sampler(mask: torch.Tensor, n: int, generator: Optional[torch.Generator] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive sampler with the contract of ``nnunet_semiseg.sampling.sample``: ``n`` indices drawn uniformly with
    replacement among the ``True`` positions of ``mask`` (in ``mask.nonzero()`` order) and unit weights.

    Returns ``(indices [n] long, weights [n] float32)`` on ``mask.device``. Raises ``ValueError`` on an empty mask."""
    m = int(mask.sum())
    if m == 0:
        raise ValueError('uniform_query_sampler: the mask has no candidate positions')
    device = generator.device if generator is not None else mask.device
    indices = torch.randint(m, (n,), generator=generator, device=device).to(mask.device)
    return indices, torch.ones(n, device=mask.device)


def negative_class_probs(prototypes: torch.Tensor, present: torch.Tensor, query_class: int, tau: float
                         ) -> torch.Tensor:
    """ACTION/ReCo's class-level hard-negative distribution for queries of ``query_class``:
    ``softmax_v(cos(mu_c, mu_v) / tau)`` over the present classes ``v != c``, 0 elsewhere.

    ``prototypes [C, D]``, ``present [C] bool``; returns ``[C] float32``. Raises ``ValueError`` if no other class is
    present."""
    others = present.clone()
    others[query_class] = False
    if not bool(others.any()):
        raise ValueError(f'no class other than {query_class} is present: no negatives to draw')
    protos = F.normalize(prototypes.float(), dim=1)
    sims = protos @ protos[query_class]
    return torch.softmax((sims / tau).masked_fill(~others, float('-inf')), dim=0)


def group_by_class(pixel_class: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pixel_class [M] long`` in ``[0, num_classes)`` -> ``(order [M] long, counts [num_classes] long)``: the indices
    sorted by class, raster order inside a class (a stable sort), and the number of pixels of each class."""
    return torch.argsort(pixel_class, stable=True), torch.bincount(pixel_class, minlength=num_classes)[:num_classes]


def sample_negatives(pixel_class: torch.Tensor, class_probs: torch.Tensor, num_queries: int, num_negatives: int,
                     generator: Optional[torch.Generator] = None,
                     grouped: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Class-aware negative sampling: for each of ``num_queries x num_negatives`` slots draw a class
    ``v ~ Cat(class_probs)``, then a pixel uniformly (with replacement) among the candidates of class ``v``.

    Args:
        pixel_class: ``[M] long``, the class of every candidate pixel (valid pixels, labelled or pseudo-labelled).
        class_probs: ``[C]`` class probabilities (e.g. :func:`negative_class_probs`); classes with mass must have
            candidates.
        generator: ``torch.Generator`` for every draw (its device is where the draws happen).
        grouped: ``group_by_class(pixel_class, C)``, for callers that draw for several classes from the same pixels
            (one sort instead of one per call); computed here when ``None``.

    Returns:
        ``[num_queries, num_negatives] long`` indices into ``pixel_class``.

    Raises:
        ValueError: a class with positive probability has no candidate pixel.
    """
    num_classes = class_probs.shape[0]
    order, counts = group_by_class(pixel_class, num_classes) if grouped is None else grouped
    if bool(((class_probs > 0) & (counts.to(class_probs.device) == 0)).any()):
        raise ValueError('sample_negatives: a class with positive probability has no candidate pixels')
    device = generator.device if generator is not None else pixel_class.device
    total = num_queries * num_negatives
    drawn = torch.multinomial(class_probs.float().to(device), total, replacement=True, generator=generator)
    uniform = torch.rand(total, generator=generator, device=device)
    drawn, uniform = drawn.to(pixel_class.device), uniform.to(pixel_class.device)
    starts = torch.cumsum(counts, 0) - counts
    n_in_class = counts[drawn]
    offset = torch.minimum((uniform * n_in_class).long(), n_in_class - 1)
    return order[starts[drawn] + offset].view(num_queries, num_negatives)


def anco_valid_mask(confidence: torch.Tensor, labeled: torch.Tensor, weak_threshold: float = 0.7) -> torch.Tensor:
    """AnCo's validity mask: every pixel of a labelled image, and unlabelled pixels whose teacher confidence is at
    least ``weak_threshold`` (0.7). ``confidence [B, *spatial]``, ``labeled [B] bool`` -> ``[B, *spatial] bool``."""
    if labeled.shape != confidence.shape[:1]:
        raise ValueError(f'labeled must be [B] = [{confidence.shape[0]}], got {tuple(labeled.shape)}')
    labeled = labeled.bool().view(-1, *([1] * (confidence.ndim - 1)))
    return labeled | (confidence >= weak_threshold)


class AnatomicalContrastLoss(nn.Module):
    """ACTION's anatomical contrast loss (AnCo; ReCo's regional contrast), spec ``action.md`` §2.3.

    For every class ``c`` present among the valid pixels (labels or pseudo-labels), with prototype ``mu_c`` = the
    mean feature of its valid pixels (pooled over the batch, detached) and hard pixels ``H_c`` = valid pixels of
    class ``c`` whose student probability of ``c`` is ``< strong_threshold``::

        Q   = num_queries pixels drawn from H_c by ``query_sampler`` (default: uniform with replacement)
        neg = per query, num_negatives pixels: class v ~ softmax_v(cos(mu_c, mu_v)/tau) over present v != c,
              then a valid pixel of class v uniformly (detached)
        l_q = CE([cos(r_q, mu_c) | cos(r_q, neg_1..neg_n)] / tau, target 0)
        L_c = sum_q w_q l_q / num_queries            (w_q = the sampler's weights; 1 for the uniform sampler)
        L   = sum_c L_c / #present classes            (a class with no hard pixel adds 0 but counts)

    ``L = 0`` (``feats.sum() * 0``, graph kept) when at most one class is present. Similarities and logits are
    computed in float32 whatever the autocast state. Only the queries carry gradient.

    Args:
        num_queries: queries per present class (256).
        num_negatives: negatives per query (512).
        tau: temperature of the logits and of the negative-class softmax (0.5; ACTION++ schedules it 1.0 -> 0.1 with
            ``cosine_tau``, pass it per call).
        strong_threshold: a pixel is a hard query if its student probability of its label is below this (0.97).
        query_sampler: ``f(mask, n, generator=None) -> (indices [n] long, weights [n] float)`` with the contract of
            ``nnunet_semiseg.sampling.sample`` (e.g. ``functools.partial(sample, mode='sag')``); ``None`` uses
            :func:`uniform_query_sampler`. It receives the hard-pixel mask of one class, shape ``[B, *spatial]``.

    Shapes (``forward``):
        feats: ``[B, D, *spatial]`` float, the student representation (or a
            :class:`~nnunet_semiseg.heads.RepresentationMap` of it, then read with gradient at the queries only),
            or flat pixels ``[N, D]`` (then labels
            ``[N]``, probs ``[N, C]``, valid ``[N]``; the sampler then sees masks of shape ``[1, N]``, so use the
            uniform sampler with flat inputs).
        labels: ``[B, *spatial]`` long: GT on labelled images, teacher argmax on unlabelled ones; values outside
            ``[0, C)`` are ignored.
        probs: ``[B, C, *spatial]``, the student softmax (detached inside); ``C`` = number of classes.
        valid: ``[B, *spatial]`` bool or ``None`` (all valid): labelled pixels and unlabelled pixels with teacher
            confidence ``>= 0.7`` (see :func:`anco_valid_mask`). Invalid pixels are never queries, negatives or
            prototype members.
        tau: optional per-call temperature; generator: optional ``torch.Generator`` for every random draw.
        returns: 0-dim float32 tensor.

    Raises:
        ValueError: bad constructor values (naming them) or inconsistent input shapes.
    """

    def __init__(self, num_queries: int = 256, num_negatives: int = 512, tau: float = 0.5,
                 strong_threshold: float = 0.97, query_sampler: Optional[QuerySampler] = None):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f'num_queries must be >= 1, got {num_queries}')
        if num_negatives < 1:
            raise ValueError(f'num_negatives must be >= 1, got {num_negatives}')
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        if not 0 < strong_threshold <= 1:
            raise ValueError(f'strong_threshold must be in (0, 1], got {strong_threshold}')
        self.num_queries, self.num_negatives = int(num_queries), int(num_negatives)
        self.tau, self.strong_threshold = float(tau), float(strong_threshold)
        self.query_sampler = query_sampler if query_sampler is not None else uniform_query_sampler

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                valid: Optional[torch.Tensor] = None, tau: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        tau = self.tau if tau is None else float(tau)
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        if feats.ndim < 2 or labels.shape != feats.shape[:1] + feats.shape[2:]:
            raise ValueError(f'feats [B, D, *spatial] and labels [B, *spatial] disagree: {tuple(feats.shape)} '
                             f'vs {tuple(labels.shape)}')
        if probs.ndim != feats.ndim or probs.shape[:1] != feats.shape[:1] or probs.shape[2:] != feats.shape[2:]:
            raise ValueError(f'probs must be [B, C, *spatial] like feats {tuple(feats.shape)}, '
                             f'got {tuple(probs.shape)}')
        if valid is not None and valid.shape != labels.shape:
            raise ValueError(f'valid must have the shape of labels {tuple(labels.shape)}, got {tuple(valid.shape)}')
        if isinstance(feats, RepresentationMap):
            # read with gradient at the queries only; prototypes and negatives come from the detached map
            rep_map = feats
            read_queries, zero = (lambda flat: rep_map.at(flat).float()), rep_map.zero
            feats, owned = rep_map.take_detached()
        else:
            owned = False
            if feats.ndim == 2:  # flat pixels [N, D]: one 'image' with one spatial axis, so no loop runs over pixels
                feats, labels, probs = feats.T.unsqueeze(0), labels.unsqueeze(0), probs.T.unsqueeze(0)
                valid = None if valid is None else valid.unsqueeze(0)
            feats3_grad = feats.reshape(feats.shape[0], feats.shape[1], -1)

            def read_queries(flat_pos: torch.Tensor) -> torch.Tensor:         # flat positions -> [n, D] float32
                return feats3_grad[flat_pos // feats3_grad.shape[2], :, flat_pos % feats3_grad.shape[2]].float()

            def zero() -> torch.Tensor:  # float32 sum: a half one overflows to inf, inf * 0 = NaN
                return feats3_grad.sum(dtype=torch.float32) * 0
        batch, dim, num_classes = feats.shape[0], feats.shape[1], probs.shape[1]
        feats3 = feats.detach().reshape(batch, dim, -1)                           # [B, D, S], a view if contiguous

        labels = labels.long()
        in_range = (labels >= 0) & (labels < num_classes)
        valid = in_range if valid is None else (valid.bool() & in_range)
        safe_labels = labels.clamp(0, num_classes - 1)
        counts = torch.bincount(safe_labels[valid], minlength=num_classes)              # valid pixels per class, [C]
        present = counts > 0
        if int(present.sum()) <= 1:
            return zero()

        with torch.no_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
            # class means in float32 over the valid pixels only (invalid ones are never read: zeroed by selection, not
            # by weights), one image at a time so that a half-precision map is never copied whole
            prototypes = feats.new_zeros((num_classes, dim), dtype=torch.float32)
            valid_flat = valid.reshape(batch, -1)
            member = F.one_hot(safe_labels.reshape(batch, -1), num_classes).float()
            for b in range(batch):
                prototypes += (torch.where(valid_flat[b], feats3[b].float(), 0.0) @ member[b]).T
            prototypes /= counts.clamp_min(1).float().unsqueeze(1)
            prob_of_label = probs.detach().gather(1, safe_labels.unsqueeze(1)).squeeze(1)
            hard = valid & (prob_of_label < self.strong_threshold)                   # [B, *spatial]
            valid_pos = valid.flatten().nonzero().squeeze(1)                         # [M]
            valid_class = safe_labels.flatten()[valid_pos]
            grouped = group_by_class(valid_class, num_classes)                       # shared by every class's draw

        # draw every class's queries and negatives first (in the order the random streams expect), then read the
        # student at all queries at once
        drawn = []
        for c in torch.nonzero(present).flatten().tolist():
            hard_c = hard & (safe_labels == c)
            if not bool(hard_c.any()):
                continue
            indices, query_weights = self.query_sampler(hard_c, self.num_queries, generator=generator)
            query_pos = hard_c.flatten().nonzero().squeeze(1)[indices]
            with torch.no_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
                class_probs = negative_class_probs(prototypes, present, c, tau)
                neg_idx = sample_negatives(valid_class, class_probs, self.num_queries, self.num_negatives, generator,
                                           grouped)
            drawn.append((c, query_pos, query_weights, neg_idx))
        loss = feats.new_zeros((), dtype=torch.float32)
        if not drawn:
            return loss / int(present.sum())
        with torch.autocast(device_type=feats.device.type, enabled=False):
            all_queries = F.normalize(read_queries(torch.cat([q for _, q, _, _ in drawn])), dim=1)  # with gradient
            with torch.no_grad():
                if owned and feats3.dtype == torch.float32:
                    # read only as unit rows from here on: normalised in place (F.normalize's operations), no
                    # second map beside it (56 MB a map on the development plans)
                    unit3 = _normalize_rows_(feats3)
                else:
                    unit3 = F.normalize(feats3.float(), dim=1)
                unit = unit3.transpose(1, 2).reshape(-1, dim)                        # [B*S, D] unit rows
            for (c, _, query_weights, neg_idx), queries in zip(drawn, all_queries.split(self.num_queries)):
                with torch.no_grad():
                    positive = F.normalize(prototypes[c], dim=0)
                # the negatives' rows are gathered again in the backward, not kept ([nq, K, D] a class)
                negatives = dots_with_rows(queries, unit, valid_pos[neg_idx.flatten()].view(self.num_queries,
                                                                                          self.num_negatives))
                logits = torch.cat([(queries @ positive).unsqueeze(1), negatives], dim=1) / tau
                ce = F.cross_entropy(logits, logits.new_zeros(self.num_queries, dtype=torch.long), reduction='none')
                loss = loss + (query_weights.to(ce.dtype) * ce).sum() / self.num_queries
        return loss / int(present.sum())


__all__ = ['AnatomicalContrastLoss', 'uniform_query_sampler', 'negative_class_probs', 'group_by_class',
           'sample_negatives', 'anco_valid_mask']
