"""The MONA/ARCO and ACTION fine-tuning computations as they were before they were made cheaper (commit f9defcf),
kept verbatim as the reference that ``test_fast_paths_equal_reference.py`` compares the current code against:
dense representation maps (the FPN head evaluated layer by layer), every loss read a gather from the whole map,
the teacher always run over labelled + unlabelled rows. ACTION++'s ASCL forward, its pixel draw and AnCo's negative
draw are kept as they were at commit 2cc958f (:class:`ReferenceAdaptiveSupervisedContrastLoss`, with the ``[N, M]``
positive mask over the queue and the concatenated logits; one stable sort per call of the draws).

The loss forwards are bound onto the current modules (:class:`ReferencePixelContrastLoss`,
:class:`ReferenceAnatomicalContrastLoss` share their buffers and helpers); the trainer functions take the
trainer as ``self``.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from nnunet_semiseg.augment import cutmix
from nnunet_semiseg.contrast.anatomical import AnatomicalContrastLoss, anco_valid_mask, negative_class_probs
from nnunet_semiseg.contrast.ascl import AdaptiveSupervisedContrastLoss
from nnunet_semiseg.contrast.pixel_contrast import (PixelContrastLoss, _randint, _randperm, entropy_alpha,
                                                    entropy_masks, resize_nearest)
from nnunet_semiseg.contrast.pseudo_label import pseudo_labels
from nnunet_semiseg.training.contrastive import _paste_like_cutmix


# ---------------------------------------------------------------------------------------------------------------
# the draws and ACTION++'s ASCL forward of commit 2cc958f

def sample_negatives(pixel_class: torch.Tensor, class_probs: torch.Tensor, num_queries: int, num_negatives: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class-aware negative sampling: for each of ``num_queries x num_negatives`` slots draw a class
    ``v ~ Cat(class_probs)``, then a pixel uniformly (with replacement) among the candidates of class ``v``.

    Args:
        pixel_class: ``[M] long``, the class of every candidate pixel (valid pixels, labelled or pseudo-labelled).
        class_probs: ``[C]`` class probabilities (e.g. :func:`negative_class_probs`); classes with mass must have
            candidates.
        generator: ``torch.Generator`` for every draw (its device is where the draws happen).

    Returns:
        ``[num_queries, num_negatives] long`` indices into ``pixel_class``.

    Raises:
        ValueError: a class with positive probability has no candidate pixel.
    """
    num_classes = class_probs.shape[0]
    counts = torch.bincount(pixel_class, minlength=num_classes)[:num_classes]
    if bool(((class_probs > 0) & (counts.to(class_probs.device) == 0)).any()):
        raise ValueError('sample_negatives: a class with positive probability has no candidate pixels')
    device = generator.device if generator is not None else pixel_class.device
    total = num_queries * num_negatives
    drawn = torch.multinomial(class_probs.float().to(device), total, replacement=True, generator=generator)
    uniform = torch.rand(total, generator=generator, device=device)
    drawn, uniform = drawn.to(pixel_class.device), uniform.to(pixel_class.device)
    order = torch.argsort(pixel_class, stable=True)           # candidates grouped by class
    starts = torch.cumsum(counts, 0) - counts
    n_in_class = counts[drawn]
    offset = torch.minimum((uniform * n_in_class).long(), n_in_class - 1)
    return order[starts[drawn] + offset].view(num_queries, num_negatives)



def sample_pixels_per_class(labels: torch.Tensor, num_classes: int, per_class: int = 256,
                            valid: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                            ) -> torch.Tensor:
    """ACTION++'s pixel selection for ASCL: ``per_class`` pixels drawn uniformly with replacement from every class
    present in ``labels``; if at most one class is present, ``per_class`` pixels drawn uniformly from all candidates.

    Args:
        labels: ``[B, *spatial]`` long ground truth (values outside ``[0, num_classes)`` are never drawn).
        valid: optional ``[B, *spatial]`` bool mask of candidates.
        generator: ``torch.Generator`` for the draws (its device is where they happen).

    Returns:
        ``[N] long`` flat indices into ``labels.flatten()`` (``N = per_class * #present``, or ``per_class``, or 0 when
        there is no candidate), grouped by class in increasing class order. Gather features with
        ``feats.movedim(1, -1).reshape(-1, D)[idx]`` and labels with ``labels.flatten()[idx]``.
    """
    if per_class < 1:
        raise ValueError(f'per_class must be >= 1, got {per_class}')
    flat = labels.flatten().long()
    candidates = (flat >= 0) & (flat < num_classes)
    if valid is not None:
        candidates &= valid.flatten().bool()
    positions = candidates.nonzero().squeeze(1)
    if positions.numel() == 0:
        return positions
    classes = flat[positions]
    counts = torch.bincount(classes, minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    device = generator.device if generator is not None else labels.device
    uniform = torch.rand(per_class * max(1, present.numel()), generator=generator, device=device).to(labels.device)
    if present.numel() <= 1:
        pick = (uniform * positions.numel()).long().clamp_max(positions.numel() - 1)
        return positions[pick]
    order = torch.argsort(classes, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    drawn_class = present.repeat_interleave(per_class)
    n_in_class = counts[drawn_class]
    offset = torch.minimum((uniform * n_in_class).long(), n_in_class - 1)
    return positions[order[starts[drawn_class] + offset]]



class ReferenceAdaptiveSupervisedContrastLoss(AdaptiveSupervisedContrastLoss):
    """AdaptiveSupervisedContrastLoss with the forward of commit 2cc958f."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                tau: Optional[float] = None, update: bool = True) -> torch.Tensor:
        if student.ndim != 2 or student.shape != teacher.shape or student.shape[1] != self.dim:
            raise ValueError(f'student and teacher must both be [N, {self.dim}], got {tuple(student.shape)} and '
                             f'{tuple(teacher.shape)}')
        if labels.shape != student.shape[:1]:
            raise ValueError(f'labels must be [N] = [{student.shape[0]}], got {tuple(labels.shape)}')
        tau = self.tau if tau is None else float(tau)
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        if student.shape[0] == 0:
            return student.sum(dtype=torch.float32) * 0
        labels = labels.long()
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f'labels must lie in [0, {self.num_classes}), got values in '
                             f'[{int(labels.min())}, {int(labels.max())}]')
        if update:
            self.update_centroids(student, labels)
            frozen = self.freeze_assignment_after is not None and int(self.num_updates) >= self.freeze_assignment_after
            if not frozen:
                self.match()
            self.num_updates += 1

        with torch.autocast(device_type=student.device.type, enabled=False):
            f = F.normalize(student.float(), dim=1)
            with torch.no_grad():
                g = F.normalize(teacher.detach().float(), dim=1)
                queue_feats, queue_labels = self.queue.get()                      # [M, D], [M]
                same_label = (queue_labels.unsqueeze(0) == labels.unsqueeze(1)).float()   # [N, M]
                n_i = same_label.sum(1) + 2.0       # teacher view + same-label queue entries + the centre
                target_col = 1 + queue_feats.shape[0] + self.assignment[labels]
            logits = torch.cat([(f * g).sum(1, keepdim=True), f @ queue_feats.float().T, f @ self.centres.T], 1) / tau
            log_prob = F.log_softmax(logits, dim=1)                                # [N, 1 + M + K]
            positives = log_prob[:, 0] + (log_prob[:, 1:1 + queue_feats.shape[0]] * same_label).sum(1)
            centre = log_prob.gather(1, target_col.unsqueeze(1)).squeeze(1)
            loss = -((positives + self.lambda_centre * centre) / n_i).mean()
        if update:
            self.queue.push(g, labels)
        return loss



class ReferencePixelContrastLoss(PixelContrastLoss):
    """PixelContrastLoss with the dense forward of commit f9defcf."""

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
        zero = student_reps.sum(dtype=torch.float32) * 0.0  # float32 sum: a half one overflows to inf, inf * 0 = NaN
        valid = labels >= 0
        present = torch.bincount(labels[valid & low_mask], minlength=self.num_classes) > 0
        if int(present.sum()) < 2:
            return zero.float()

        with torch.autocast(device_type=device.type, enabled=False):
            s3 = student_reps.reshape(b, d, -1)                  # [B, D, P] views, gathered per position
            t3 = teacher_reps.detach().reshape(b, d, -1)
            probs = probs.reshape(b, self.num_classes, -1).float()
            lab, low, high = labels.reshape(b, -1), low_mask.reshape(b, -1), high_mask.reshape(b, -1)
            n_pos = lab.shape[1]

            def gather(x3, flat):  # x3 [B, D, P], flat positions [n] in [0, B*P) -> [n, D] float32
                return x3[flat // n_pos, :, flat % n_pos].float()

            def positions(mask2):  # [B, P] bool -> flat positions in mask.nonzero() (raster) order
                return mask2.reshape(-1).nonzero().squeeze(1)

            anchor_classes = [c for c in range(self.num_classes) if c > 0 or self.include_background]
            # class prototypes (positives): mean teacher rep over label == c & low_mask, all classes in one pass
            member = F.one_hot(lab.clamp_min(0), self.num_classes).float() * (valid.reshape(b, -1) & low)[..., None]
            protos = torch.einsum('bdp,bpc->cd', t3.float(), member) / member.sum((0, 1)).clamp_min(1.0)[:, None]
            protos = F.normalize(protos, dim=1)                                                # [C, D]
            if self.negative_mode == 'bank':
                ReferencePixelContrastLoss._push_negatives(self, t3, gather, positions, lab, high, probs,
                                                           is_labeled.to(device, torch.bool), anchor_classes,
                                                           generator)

            losses = []
            for c in anchor_classes:
                if not bool(present[c]):
                    continue
                valid_c = (lab == c) & low
                anchor_mask = valid_c & (probs[:, c] > self.anchor_threshold)
                if not bool(anchor_mask.any()):
                    continue
                idx_a, w_a = self._draw(anchor_mask.view(b, *sp), self.num_queries, self.sampler, generator)
                anchors = F.normalize(gather(s3, positions(anchor_mask)[idx_a]), dim=1)      # [nq, D]
                negatives, neg_logw = ReferencePixelContrastLoss._negatives(self, c, t3, gather, positions, lab, low,
                                                                            b, sp, generator)
                pos_logit = anchors @ protos[c] / self.temperature                                  # [nq]
                neg_logits = torch.einsum('qd,qkd->qk', anchors, negatives) / self.temperature + neg_logw
                logits = torch.cat((pos_logit[:, None], neg_logits), dim=1)                    # [nq, 1 + K]
                ce = torch.logsumexp(logits, dim=1) - pos_logit
                losses.append((w_a * ce).sum() / self.num_queries)
            if not losses:
                return zero.float()
            return torch.stack(losses).mean()

    @torch.no_grad()
    def _push_negatives(self, t3, gather, positions, lab, high, probs, is_labeled, classes, generator):
        """Push U2PL's intended hard negatives of every class ``c`` (teacher reps, L2-normalised) to bank ``c``."""
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
            self.banks[c].push(F.normalize(gather(t3, flat), dim=1))

    def _negatives(self, c, t3, gather, positions, lab, low, b, sp, generator):
        """``num_queries x num_negatives`` negatives for class ``c``: ``([nq, K, D] float32 unit, [nq, K] log w)``."""
        nq, k = self.num_queries, self.num_negatives
        if self.negative_mode == 'bank' and len(self.banks[c]) > 0:
            feats = self.banks[c].get()
            idx = _randint(feats.shape[0], nq * k, generator, feats.device)
            return feats[idx].float().view(nq, k, -1), torch.zeros(nq, k, device=feats.device)
        neg_mask = (lab >= 0) & (lab != c) & low
        which = self.sampler if self.sample_negatives_with == 'same' else 'naive'
        idx, w = self._draw(neg_mask.view(b, *sp), nq * k, which, generator)
        if which != 'naive':  # stratified draws come grouped by stratum: shuffle so each anchor sees all strata
            perm = _randperm(idx.numel(), generator, idx.device)
            idx, w = idx[perm], w[perm]
        negatives = F.normalize(gather(t3, positions(neg_mask)[idx]), dim=1)
        return negatives.view(nq, k, -1), torch.log(w.clamp_min(1e-12)).view(nq, k)


class ReferenceAnatomicalContrastLoss(AnatomicalContrastLoss):
    """AnatomicalContrastLoss with the dense forward of commit f9defcf."""

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
        if feats.ndim == 2:  # flat pixels [N, D]: one 'image' with one spatial axis, so no loop runs over pixels
            feats, labels, probs = feats.T.unsqueeze(0), labels.unsqueeze(0), probs.T.unsqueeze(0)
            valid = None if valid is None else valid.unsqueeze(0)
        batch, dim, num_classes = feats.shape[0], feats.shape[1], probs.shape[1]
        feats3 = feats.reshape(batch, dim, -1)                                    # [B, D, S], a view if contiguous
        positions = feats3.shape[2]

        def gather(flat_pos: torch.Tensor) -> torch.Tensor:                     # flat positions -> [n, D] float32
            return feats3[flat_pos // positions, :, flat_pos % positions].float()

        labels = labels.long()
        in_range = (labels >= 0) & (labels < num_classes)
        valid = in_range if valid is None else (valid.bool() & in_range)
        safe_labels = labels.clamp(0, num_classes - 1)
        counts = torch.bincount(safe_labels[valid], minlength=num_classes)              # valid pixels per class, [C]
        present = counts > 0
        if int(present.sum()) <= 1:
            return feats.sum(dtype=torch.float32) * 0  # float32 sum: a half one overflows to inf, inf * 0 = NaN

        with torch.no_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
            # class means in float32 over the valid pixels only (invalid ones are never read), one image at a time
            # so that a half-precision map is never copied whole
            prototypes = feats.new_zeros((num_classes, dim), dtype=torch.float32)
            valid_flat, labels_flat = valid.reshape(batch, -1), safe_labels.reshape(batch, -1)
            for b in range(batch):
                pos = valid_flat[b].nonzero().squeeze(1)
                prototypes.index_add_(0, labels_flat[b, pos], feats3[b][:, pos].T.float())
            prototypes /= counts.clamp_min(1).float().unsqueeze(1)
            prob_of_label = probs.detach().gather(1, safe_labels.unsqueeze(1)).squeeze(1)
            hard = valid & (prob_of_label < self.strong_threshold)                   # [B, *spatial]
            valid_pos = valid.flatten().nonzero().squeeze(1)                         # [M]
            valid_class = safe_labels.flatten()[valid_pos]

        loss = feats.new_zeros((), dtype=torch.float32)
        for c in torch.nonzero(present).flatten().tolist():
            hard_c = hard & (safe_labels == c)
            if not bool(hard_c.any()):
                continue
            indices, query_weights = self.query_sampler(hard_c, self.num_queries, generator=generator)
            query_pos = hard_c.flatten().nonzero().squeeze(1)[indices]
            with torch.autocast(device_type=feats.device.type, enabled=False):
                queries = F.normalize(gather(query_pos), dim=1)                      # [Q, D], with gradient
                with torch.no_grad():
                    class_probs = negative_class_probs(prototypes, present, c, tau)
                    neg_idx = sample_negatives(valid_class, class_probs, self.num_queries, self.num_negatives,
                                               generator)
                    negatives = F.normalize(gather(valid_pos[neg_idx.flatten()]), dim=1)
                    negatives = negatives.view(self.num_queries, self.num_negatives, dim)
                    positive = F.normalize(prototypes[c], dim=0)
                logits = torch.cat([(queries @ positive).unsqueeze(1),
                                    torch.einsum('qd,qnd->qn', queries, negatives)], dim=1) / tau
                ce = F.cross_entropy(logits, logits.new_zeros(self.num_queries, dtype=torch.long), reduction='none')
                loss = loss + (query_weights.to(ce.dtype) * ce).sum() / self.num_queries
        return loss / int(present.sum())
        return loss / int(present.sum())


# ---------------------------------------------------------------------------------------------------------------
# the trainer's fine-tuning step of commit f9defcf (functions of the trainer)

def prepare_student_input(self, data, data_weak, data_strong):
    n = data.shape[0]
    t_logits, t_feats = self.teacher_forward(data if data_weak is None else torch.cat((data, data_weak)))
    cache = {'t_logits': t_logits.float(), 't_feats': t_feats, 'box': None}
    rows = {'labeled': slice(0, n)}
    x = data
    if data_weak is not None:
        probs_u, labels_u, conf_u = pseudo_labels(t_logits[n:])
        strong = data_strong
        if not self.in_pretraining and self.use_cutmix and strong.shape[0] > 1:
            strong, labels_u, conf_u, probs_u, cache['box'] = cutmix(strong, labels_u, conf_u, probs_u)
        cache.update(probs_u=probs_u, labels_u=labels_u, conf_u=conf_u)
        x = torch.cat((data, strong))
        rows['unlabeled'] = slice(n, n + strong.shape[0])
    self._cache = cache
    if not self.in_pretraining:
        x, rows = self.append_student_rows(x, rows)
    return x, rows


def _labels_probs_conf(self, batch):
    n = batch.num_labeled
    gt = batch.target_full_res[:, 0].long()
    if self.label_manager.has_ignore_label:
        gt = torch.where(gt == self.label_manager.ignore_label, torch.full_like(gt, -1), gt)
    probs_l = self._cache['t_logits'][:n].softmax(1)
    if not batch.has_unlabeled:
        return gt, probs_l, torch.ones_like(gt, dtype=torch.float32)
    return (torch.cat((gt, self._cache['labels_u'])), torch.cat((probs_l, self._cache['probs_u'])),
            torch.cat((torch.ones_like(gt, dtype=torch.float32), self._cache['conf_u'])))


def _representations(self, batch, predictor: Optional[str] = None):
    # the FPN head layer by layer (its code of commit f9defcf is FPNProjectionHead.forward_layered)
    mods = self.semiseg_modules
    rows = slice(0, batch.num_labeled + (batch.data_weak.shape[0] if batch.has_unlabeled else 0))
    feats = self.student_features()
    student = mods['rep_head'].forward_layered([feats[i][rows] for i in self.tapped_decoder_stages])
    if predictor is not None:
        student = mods[predictor](student)
    with torch.no_grad():
        teacher = self.teacher.module['rep_head'].forward_layered(
            [self._cache['t_feats'][i] for i in self.tapped_decoder_stages])
        if self._cache['box'] is not None:
            n = batch.num_labeled
            teacher = torch.cat((teacher[:n], _paste_like_cutmix(teacher[n:], self._cache['box'])))
    return student, teacher


def pixel_contrast_finetune_terms(self, batch):
    mods = self.semiseg_modules
    n = batch.num_labeled
    labels, probs, conf = _labels_probs_conf(self, batch)
    student, teacher = _representations(self, batch, predictor='rep_predictor')
    low = torch.ones_like(labels, dtype=torch.bool)
    high = low.clone()
    if batch.has_unlabeled:
        step, length = self.finetune_progress
        low_u, high_u = entropy_masks(self._cache['probs_u'], entropy_alpha(step, length))
        low, high = torch.cat((low[:n], low_u)), torch.cat((high[:n], high_u))
    is_labeled = torch.arange(labels.shape[0], device=labels.device) < n
    terms = {'contrast': (self.lambda_contrast, ReferencePixelContrastLoss.forward(
        mods['pixel_contrast'], student, teacher, labels, probs, low, high, is_labeled))}
    if batch.has_unlabeled:
        terms['nearest_neighbour'] = (self.lambda_nn, mods['nearest_neighbour'](student[n:], teacher[n:]))
    if self.lambda_equivariance > 0:
        eqv, theta = mods['equivariance'], self._cache['theta']
        base_rows = slice(0, labels.shape[0])
        target = eqv.warp(batch.logits('all')[base_rows].detach().float(), theta)
        mask = eqv.warp(eqv.confidence_mask(labels, conf), theta)
        terms['equivariance'] = (self.lambda_equivariance,
                                 eqv(batch.logits('equivariance').float(), target, mask))
    return terms


def anatomical_finetune_terms(self, batch):
    mods = self.semiseg_modules
    n = batch.num_labeled
    labels, _, conf = _labels_probs_conf(self, batch)
    student, teacher = _representations(self, batch)
    size = student.shape[2:]
    rows = slice(0, labels.shape[0])
    student_probs = batch.logits('all')[rows].detach().float().softmax(1)
    is_labeled = torch.arange(labels.shape[0], device=labels.device) < n
    valid = anco_valid_mask(conf, is_labeled, self.weak_threshold)
    labels_r, valid_r = resize_nearest(labels, size), resize_nearest(valid, size)
    step, length = self.finetune_progress
    terms = {'anatomical_contrast': (self.lambda_anco, ReferenceAnatomicalContrastLoss.forward(
        mods['anatomical_contrast'], student, labels_r, resize_nearest(student_probs, size), valid_r,
        tau=self._tau(step, length, self.anco_tau)))}
    if self.use_ascl:
        idx = sample_pixels_per_class(labels_r[:n], self.label_manager.num_segmentation_heads,
                                      self.ascl_pixels_per_class)
        d = student.shape[1]
        f = student[:n].movedim(1, -1).reshape(-1, d)[idx]
        g = teacher[:n].movedim(1, -1).reshape(-1, d)[idx]
        y = labels_r[:n].flatten()[idx]
        terms['supervised_contrast'] = (self.lambda_ascl, ReferenceAdaptiveSupervisedContrastLoss.forward(
            mods['supervised_contrast'], f, g, y, tau=self._tau(step, length, self.tau_min)))
    return terms


def compute_semisupervised_terms(self, batch):
    """The fine-tuning terms of commit f9defcf (``self`` in its fine-tuning phase)."""
    from nnunet_semiseg.contrast.mona import confidence_weighted_ce
    from nnunet_semiseg.training.contrastive import PixelContrastMethod
    terms = {}
    if batch.has_unlabeled:
        terms['unsup'] = (self.lambda_unsup, confidence_weighted_ce(batch.logits('unlabeled'), self._cache['labels_u'],
                                                                    self._cache['conf_u'], self.unsup_threshold))
    finetune = pixel_contrast_finetune_terms if isinstance(self, PixelContrastMethod) else anatomical_finetune_terms
    terms.update(finetune(self, batch))
    return terms
