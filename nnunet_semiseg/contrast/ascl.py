"""ACTION++'s adaptive supervised contrastive loss (ASCL; the paper's ``L_aaco``), after TSC ("Targeted Supervised
Contrastive learning", Li et al., CVPR 2022).

ACTION++ (You et al., MICCAI 2023, arXiv 2304.02689) fixes ``K`` uniformly spread centres on the sphere
(:func:`nnunet_semiseg.centres.uniform_centres`), keeps an EMA centroid of each class's student features, assigns
classes to centres by the Hungarian algorithm every step, and adds the assigned centre as an extra positive so that
every class, however rare, gets its own well-separated region of the feature space. Spec ``action.md`` §3.3-3.4.
We implement the released code's form (spec D5), documented in :class:`AdaptiveSupervisedContrastLoss`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.autograd.function import once_differentiable

from nnunet_semiseg.centres import uniform_centres
from nnunet_semiseg.contrast.memory import FeatureQueue


@torch.no_grad()
def hungarian_assignment(centroids: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Class-to-centre assignment maximising ``sum_c <mu_c, psi_{pi(c)}>`` (``scipy.optimize.linear_sum_assignment``
    on ``-mu @ psi^T``); for unit vectors this minimises the sum of squared distances.

    ``centroids [K, D]``, ``centres [K, D]`` -> ``pi [K] long`` on ``centroids.device`` (``pi[c]`` = centre index of
    class ``c``)."""
    if centroids.shape != centres.shape or centroids.ndim != 2:
        raise ValueError(f'centroids and centres must both be [K, D], got {tuple(centroids.shape)} and '
                         f'{tuple(centres.shape)}')
    # float64 on the CPU: autocast leaves float64 alone, and bfloat16 cosines tie classes that are 1e-3 apart
    cost = -(centroids.detach().double().cpu() @ centres.detach().double().cpu().T).numpy()
    rows, cols = linear_sum_assignment(cost)
    assignment = torch.empty(centroids.shape[0], dtype=torch.long)
    assignment[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return assignment.to(centroids.device)


class _LogSumExpOfProducts(torch.autograd.Function):
    """``lse [N] = logsumexp(a @ b.T, dim=1)`` for ``a [N, D]`` (with gradient) and a constant ``b [M, D]``, ``M >= 1``.

    ``torch.logsumexp(a @ b.T, 1)`` keeps the ``[N, M]`` logits and, in the backward, makes three more ``[N, M]``
    tensors (``x - lse``, its exp, the product with the gradient); here the forward exponentiates the logits in
    place and keeps them, and the backward is one product, ``d lse_i / d a = sum_j softmax_ij b_j``, with the
    softmax's row normalisation applied to its ``[N, D]`` result (a row scale commutes with the product)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logits = a @ b.T                                                         # [N, M]
        shift = logits.amax(1, keepdim=True)
        weights = logits.sub_(shift).exp_()                                      # exp(logit - row max), in place
        total = weights.sum(1)
        ctx.save_for_backward(weights, total, b)
        return total.log() + shift.squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weights, total, b = ctx.saved_tensors
        return (grad / total).unsqueeze(1) * (weights @ b), None


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


class AdaptiveSupervisedContrastLoss(nn.Module):
    """ACTION++ adaptive supervised contrast over labelled pixels, in the released code's form (spec D5).

    For ``N`` sampled labelled pixels with student features ``f_i`` and teacher features ``g_i`` of the same pixel
    (both L2-normalised inside), a queue ``Q`` of earlier teacher features with labels, and centres ``psi``::

        logits_i = [f_i.g_i | f_i.Q_1 .. f_i.Q_M | f_i.psi_1 .. f_i.psi_K] / tau        (float32)
        logp_i   = log_softmax(logits_i)
        P_i      = {teacher view of pixel i} U {queue entries with label y_i}
        n_i      = |P_i| + 1          (the centre positive always counts, even if lambda = 0: code parity, B16)
        loss     = -(1/N) sum_i (1/n_i) [ sum_{j in P_i} logp_i[j] + lambda * logp_i[psi_{pi(y_i)}] ]

    ``pi`` is the Hungarian assignment of the EMA class centroids to the centres. Gradients reach only the student
    features; the teacher features, queue and centres are constants.

    Computed without the ``[N, M]`` log-probabilities: with ``lse_i = log sum_j exp(logits_ij)``, every positive's
    ``logp_i[j] = logits_i[j] - lse_i`` and the queue positives' logits sum to ``f_i . S_{y_i} / tau`` with ``S_c``
    the sum of the queue features of class ``c``; the only ``[N, M]`` work left is ``lse`` over the queue (one
    product each way). Same values and gradients as the written form to float32 rounding
    (``tests/test_fast_paths_equal_reference.py``).

    One call (``update=True``, the training default) does, in order: (1) centroid EMA with this batch's detached
    student features, ``mu_c <- normalize(m mu_c + (1 - m) normalize(mean_{y_i = c} f_i))`` for each class present;
    (2) Hungarian re-assignment (unless frozen); (3) the loss; (4) push ``(g, labels)`` into the queue.
    Only filled queue entries are used (the code's queue starts with 12 288 random vectors of label -1; ours starts
    empty).

    Args:
        num_classes: ``K`` classes including background (= number of centres).
        dim: feature dimension ``D`` (paper 128).
        queue_size: teacher-feature queue length (12 288, the code's value).
        lambda_centre: weight of the centre positive (paper 0.2; 2D code 0.1).
        centroid_momentum: ``m`` of the centroid EMA (0.9, i.e. the code's ``eta = 0.1``).
        tau: default temperature (0.1, the paper's ATS minimum); ACTION++ passes ``cosine_tau(step, total, 0.1, 1.0)``
            per call.
        centre_seed: seed of the centres and of the random initial centroids (same on every rank).
        centres: optional ``[K, D]`` centres to use instead of ``uniform_centres(K, D)`` (normalised).
        freeze_assignment_after: stop re-assigning after this many updates (``None``: never freeze, as in the code).

    Shapes:
        ``forward(student [N, D], teacher [N, D], labels [N] long in [0, K), tau=None, update=True) -> 0-dim``.
        ``N = 0`` returns ``student.sum() * 0`` and changes nothing.

    Buffers (save with the checkpoint): ``centres [K, D]``, ``centroids [K, D]``, ``assignment [K] long``,
    ``num_updates`` (long scalar), ``queue.feats [queue_size, D]``, ``queue.labels``, ``queue.ptr``, ``queue.count``.

    Raises:
        ValueError: bad constructor values (naming them), shapes that disagree, labels outside ``[0, K)``.
    """

    def __init__(self, num_classes: int, dim: int, queue_size: int = 12288, lambda_centre: float = 0.2,
                 centroid_momentum: float = 0.9, tau: float = 0.1, centre_seed: int = 0,
                 centres: Optional[torch.Tensor] = None, freeze_assignment_after: Optional[int] = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2, got {num_classes}')
        if dim < 1:
            raise ValueError(f'dim must be >= 1, got {dim}')
        if lambda_centre < 0:
            raise ValueError(f'lambda_centre must be >= 0, got {lambda_centre}')
        if not 0 <= centroid_momentum < 1:
            raise ValueError(f'centroid_momentum must be in [0, 1), got {centroid_momentum}')
        if not tau > 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        if freeze_assignment_after is not None and freeze_assignment_after < 0:
            raise ValueError(f'freeze_assignment_after must be >= 0 or None, got {freeze_assignment_after}')
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.lambda_centre, self.tau = float(lambda_centre), float(tau)
        self.centroid_momentum = float(centroid_momentum)
        self.freeze_assignment_after = freeze_assignment_after
        generator = torch.Generator().manual_seed(int(centre_seed))
        if centres is None:
            centres = uniform_centres(self.num_classes, self.dim, generator)
        elif tuple(centres.shape) != (self.num_classes, self.dim):
            raise ValueError(f'centres must be [{self.num_classes}, {self.dim}], got {tuple(centres.shape)}')
        centroids = F.normalize(torch.randn(self.num_classes, self.dim, generator=generator), dim=1)
        self.register_buffer('centres', F.normalize(centres.detach().float(), dim=1))
        self.register_buffer('centroids', centroids)
        self.register_buffer('assignment', hungarian_assignment(centroids, self.centres))
        self.register_buffer('num_updates', torch.zeros((), dtype=torch.long))
        self.queue = FeatureQueue(queue_size, self.dim, with_labels=True)

    @torch.no_grad()
    def update_centroids(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA update of the centroids of the classes present in ``labels [N]`` from ``feats [N, D]`` (normalised,
        detached): ``mu_c <- normalize(m mu_c + (1 - m) normalize(mean_{y_i = c} normalize(f_i)))``."""
        f = F.normalize(feats.detach().float(), dim=1)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, f)
        present = torch.bincount(labels, minlength=self.num_classes) > 0
        batch_means = F.normalize(sums, dim=1)
        updated = F.normalize(self.centroid_momentum * self.centroids + (1 - self.centroid_momentum) * batch_means,
                              dim=1)
        self.centroids.copy_(torch.where(present.unsqueeze(1), updated, self.centroids))

    @torch.no_grad()
    def match(self) -> torch.Tensor:
        """Recompute and store the Hungarian class-to-centre assignment from the current centroids; ``[K] long``."""
        self.assignment.copy_(hungarian_assignment(self.centroids, self.centres))
        return self.assignment

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
            f = F.normalize(student.float(), dim=1) / tau                         # [N, D]: every logit is f.x
            with torch.no_grad():
                g = F.normalize(teacher.detach().float(), dim=1)
                queue_feats, queue_labels = self.queue.get()   # [M, D], [M]: a copy, the push below writes the queue
                # the queue positives of pixel i are the entries of class y_i, so their logits sum to
                # f_i . (sum of the queue features of class y_i): K sums instead of an [N, M] mask
                class_sums = queue_feats.new_zeros(self.num_classes, self.dim).index_add_(0, queue_labels,
                                                                                          queue_feats.float())
                class_counts = torch.bincount(queue_labels, minlength=self.num_classes).float()
                in_queue = class_counts[labels]                                   # [N]
                centre_col = self.assignment[labels].unsqueeze(1)
            teacher_logit = (f * g).sum(1)                                        # [N]
            centre_logits = f @ self.centres.T                                    # [N, K]
            # log of the softmax denominator over [teacher | queue | centres], without concatenating the
            # [N, 1 + M + K] logits; log_softmax(x)_j = x_j - lse, so each positive's log-probability is its
            # logit minus lse
            parts = [teacher_logit, torch.logsumexp(centre_logits, 1)]
            if queue_feats.shape[0] > 0:
                parts.append(_LogSumExpOfProducts.apply(f, queue_feats.float()))
            lse = torch.logsumexp(torch.stack(parts, 1), 1)                       # [N]
            queue_positives = (f * class_sums[labels]).sum(1)                     # [N]
            centre = centre_logits.gather(1, centre_col).squeeze(1)
            positives = teacher_logit + queue_positives + self.lambda_centre * centre \
                - (1 + in_queue + self.lambda_centre) * lse
            loss = -(positives / (in_queue + 2.0)).mean()   # n_i: teacher view + same-label queue entries + centre
        if update:
            self.queue.push(g, labels)
        return loss


__all__ = ['AdaptiveSupervisedContrastLoss', 'hungarian_assignment', 'sample_pixels_per_class']
