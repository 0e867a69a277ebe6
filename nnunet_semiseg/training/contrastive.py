"""The two-stage contrastive pipeline shared by MONA / ARCO and ACTION / ACTION++ (docs/training_schedule.md).

Stage 1, *relational pre-training* (the first ``pretrain_fraction`` of the iterations): supervised loss plus ISD-style
relational distillation from the EMA teacher, globally (bottleneck embeddings against a bank of 36 teacher
embeddings) and locally (per-window embeddings of the segmentation logits), ``tau_s = 0.1``, ``tau_t = 0.01``.
MONA/ARCO (spec arco_mona.md §1.2) and ACTION (spec action.md §1.3-1.4, stages i and ii merged) describe the same
terms; the papers run the stages as separate trainings, here they are the two phases of one nnU-Net run, so a
killed run continues with ``--c`` in whichever phase it was.

Stage 2, *fine-tuning*: the method's terms (:class:`PixelContrastMethod` for MONA/ARCO,
:class:`AnatomicalContrastMethod` for ACTION/ACTION++), always with the confidence-weighted pseudo-label loss on the
strong (CutMix-ed) unlabelled view, pseudo-labels from the teacher on the weak view.

Every step: one teacher forward over ``cat(labelled, weak unlabelled)`` (pseudo-labels, teacher features; ACTION's
fine-tuning reads the unlabelled rows only and runs the teacher on them alone), then one student forward over
``cat(labelled, strong unlabelled)``. MONA/ARCO's 2D equivariance view of those rows runs in a second student
forward after the first backward (its target is the first pass's detached logits, so the gradient is the one-forward
gradient at the peak memory of one graph; ``equivariance_second_pass = False`` runs it in the first forward, as the
released code does). The representation heads are read only where the losses
read them (:class:`~nnunet_semiseg.heads.RepresentationMap`): anchors, queries and spatial means of the student map;
the teacher map, whose prototypes and bank negatives span the batch, is computed whole, without gradient.
"""
import math
from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nnunet_semiseg.augment import cutmix
from nnunet_semiseg.contrast.anatomical import AnatomicalContrastLoss, anco_valid_mask
from nnunet_semiseg.contrast.ascl import AdaptiveSupervisedContrastLoss, sample_pixels_per_class
from nnunet_semiseg.contrast.distillation import (GlobalDistillationLoss, LocalDistillationLoss,
                                                  LocalPredictionHead, LocalProjectionHead, num_windows)
from nnunet_semiseg.contrast.mona import EquivarianceLoss, NearestNeighbourLoss, confidence_weighted_ce
from nnunet_semiseg.contrast.pixel_contrast import (PixelContrastLoss, entropy_alpha, entropy_masks,
                                                    resize_nearest)
from nnunet_semiseg.contrast.pseudo_label import pseudo_labels
from nnunet_semiseg.gate import ClassDiceGate
from nnunet_semiseg.heads import (DEFAULT_OUTPUT_LEVEL, DEFAULT_REP_DIM, EmbeddingHead, FPNProjectionHead, Predictor,
                                  RepresentationMap)
from nnunet_semiseg.schedules import cosine_tau, sigmoid_rampup
from nnunet_semiseg.training.base import SemiSegBatch, nnUNetTrainerSemiSupervised


def _paste_like_cutmix(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mix ``x [B, C, *sp]`` as :func:`~nnunet_semiseg.augment.cutmix` mixed the images: inside ``box`` (resized to
    ``x``'s size) row ``i`` takes row ``(i + 1) % B``. Mixed channels-last (one vector per position), so a
    channels-last map stays one."""
    box = resize_nearest(box, x.shape[2:])[..., None]
    rows = x.movedim(1, -1)
    return torch.where(box, rows.roll(-1, dims=0), rows).movedim(-1, 1)


class nnUNetTrainerContrastiveBase(nnUNetTrainerSemiSupervised):
    """Plumbing of the two-stage pipeline (module docstring). Method subclasses implement
    :meth:`build_method_modules` and :meth:`finetune_terms`; the named trainers in ``trainers/`` set attributes."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise RuntimeError(f'{self.__class__.__name__} contrasts classes of a label map; region-based datasets '
                               f'(dataset.json "regions_class_order") are not supported.')
        spatial_dims = len(self.configuration_manager.patch_size)
        n_decoder_stages = self.configuration_manager.network_arch_init_kwargs['n_stages'] - 1
        self.ema_warmup = False              # the papers' code: constant 0.99 from the first step
        self.pretrain_fraction = 1 / 3       # MONA/ARCO: 100 pre-training + 200 fine-tuning epochs
        # relational pre-training
        self.lambda_global, self.lambda_local = 1.0, 1.0
        self.embedding_dim, self.distillation_bank_size = 512, 36
        self.tau_student, self.tau_teacher = 0.1, 0.01
        self.local_pool = 8 if spatial_dims == 2 else 4
        # fine-tuning
        self.rep_dim = DEFAULT_REP_DIM[spatial_dims]
        self.rep_output_level = DEFAULT_OUTPUT_LEVEL[spatial_dims]
        self.lambda_unsup = 1.0
        self.unsup_rampup_fraction = 0.0   # sigmoid ramp of lambda_unsup over this share of fine-tuning; 0: none (papers)
        self.unsup_threshold = 0.97
        # The pseudo-label loss waits until the teacher's Dice on the labelled rows reaches unsup_gate_threshold on
        # every foreground class (nnunet_semiseg.gate): a teacher that has not found a class teaches its absence on
        # every unlabelled pixel (docs/tuning.md, runs 32-38). At the papers' lengths it opens during pre-training, a
        # no-op. unsup_gate_deadline: the share of fine-tuning after which it opens anyway (1.0: never forced; the
        # log then warns). None: the papers' schedule, pseudo-labels from the first fine-tuning step.
        self.unsup_gate_threshold = 0.5
        self.unsup_gate_deadline = 1.0
        self.use_cutmix = True
        self.sampler = 'naive'              # 'naive' | 'sg' | 'sag' (nnunet_semiseg.sampling), any method
        self.sampler_grid = None            # None: 4x4 in 2D, 4x4 in plane x 2 through plane in 3D
        k = min(4, n_decoder_stages)
        self.tapped_decoder_stages = tuple(range(-k, 0))  # the finest k decoder stages, coarse -> fine
        self.tap_bottleneck = True
        self.ema_module_names = ('global_head', 'local_head', 'rep_head')
        self.loss_term_names = ('global_distillation', 'local_distillation', 'unsup')
        self._cache: dict = {}

    # ------------------------------------------------------------------ modules
    @property
    def pretrain_iterations(self) -> int:
        return int(round(self.pretrain_fraction * self.total_iterations))

    @property
    def in_pretraining(self) -> bool:
        return self.semiseg_step < self.pretrain_iterations

    @property
    def finetune_progress(self) -> Tuple[int, int]:
        """(step, length) of the fine-tuning phase."""
        return max(0, self.semiseg_step - self.pretrain_iterations), max(1, self.total_iterations - self.pretrain_iterations)

    def _local_windows(self):
        patch = [int(p) for p in self.configuration_manager.patch_size]
        window = [max(1, math.ceil(p / 4)) for p in patch]
        pool = [min(self.local_pool, w) for w in window]
        return patch, window, pool

    def build_semiseg_modules(self, network: nn.Module) -> Dict[str, nn.Module]:
        conv_op = network.encoder.conv_op
        encoder_channels = list(network.encoder.output_channels)
        num_classes = self.label_manager.num_segmentation_heads
        n_stages = len(network.decoder.stages)
        # decoder stage s (0 = coarsest) outputs encoder_channels[-(s + 2)] channels
        tapped_channels = [encoder_channels[-((n_stages + i) % n_stages + 2)] for i in self.tapped_decoder_stages]
        patch, window, pool = self._local_windows()
        modules = {
            'global_head': EmbeddingHead(encoder_channels[-1], self.embedding_dim),
            'global_predictor': Predictor(nn.Linear, self.embedding_dim),
            'global_kl': GlobalDistillationLoss(self.embedding_dim, self.distillation_bank_size, self.tau_student,
                                                self.tau_teacher),
            'local_head': LocalProjectionHead(conv_op, num_classes, pool, window),
            'local_predictor': LocalPredictionHead(conv_op, num_classes),
            'local_kl': LocalDistillationLoss(num_windows(patch, window), num_classes * math.prod(pool),
                                              self.distillation_bank_size, self.tau_student, self.tau_teacher),
            'rep_head': FPNProjectionHead(conv_op, tapped_channels, self.rep_dim, output_level=self.rep_output_level),
        }
        if self.unsup_gate_threshold is not None:
            modules['unsup_gate'] = ClassDiceGate(num_classes, self.unsup_gate_threshold)
        modules.update(self.build_method_modules(network, num_classes))
        return modules

    def build_method_modules(self, network: nn.Module, num_classes: int) -> Dict[str, nn.Module]:
        return {}

    def query_sampler(self):
        """The sampler as a ``fn(mask, n, generator=None) -> (indices, weights)`` callable."""
        from nnunet_semiseg.sampling import sample
        return partial(sample, mode=self.sampler, grid=self.sampler_grid)

    # ------------------------------------------------------------------ the step
    def teacher_reads_labeled(self) -> bool:
        """Whether this step reads the teacher's output on the labelled rows (relational pre-training does;
        a fine-tuning method that reads only pseudo-labels of the unlabelled rows returns False, and the teacher
        then runs on the weak unlabelled view alone)."""
        return True

    def prepare_student_input(self, data, data_weak, data_strong):
        n = data.shape[0]
        with_labeled = self.teacher_reads_labeled() or not self.unsup_gate_open()
        teacher_input = data if data_weak is None else (torch.cat((data, data_weak)) if with_labeled else data_weak)
        cache = {'t_logits': None, 't_feats': {}, 't_labeled_rows': 0, 'box': None}
        if with_labeled or data_weak is not None:
            t_logits, t_feats = self.teacher_forward(teacher_input)
            cache.update(t_logits=t_logits.float(), t_feats=t_feats, t_labeled_rows=n if with_labeled else 0)
        rows = {'labeled': slice(0, n)}
        x = data
        if data_weak is not None:
            probs_u, labels_u, conf_u = pseudo_labels(cache['t_logits'][cache['t_labeled_rows']:])
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

    def append_student_rows(self, x: torch.Tensor, rows: Dict[str, slice]) -> Tuple[torch.Tensor, Dict[str, slice]]:
        return x, rows

    def compute_semisupervised_terms(self, batch: SemiSegBatch):
        self._update_unsup_gate(batch)
        if self.in_pretraining:
            terms = self.relational_terms(batch)
        else:
            terms = {}
            if batch.has_unlabeled:
                terms['unsup'] = (self.current_lambda_unsup(),
                                  confidence_weighted_ce(batch.logits('unlabeled'), self._cache['labels_u'],
                                                         self._cache['conf_u'], self.unsup_threshold))
            terms.update(self.finetune_terms(batch))
        self._release_teacher_outputs()
        return terms

    def current_lambda_unsup(self) -> float:
        """The pseudo-label loss's weight at this fine-tuning step: ``lambda_unsup`` times a sigmoid ramp over the first
        ``unsup_rampup_fraction`` of fine-tuning (a share, so one setting serves every schedule length)."""
        step, length = self.finetune_progress
        if not self.unsup_gate_open():
            return 0.0
        return self.lambda_unsup * sigmoid_rampup(step, self.unsup_rampup_fraction * length)

    def unsup_gate_open(self) -> bool:
        gate = self.semiseg_modules['unsup_gate'] if 'unsup_gate' in self.semiseg_modules else None
        return gate is None or bool(gate.is_open)

    def _update_unsup_gate(self, batch: SemiSegBatch) -> None:
        """Feed the teacher's labelled rows to the gate (while it is closed); open it at the deadline. Logs the opening."""
        if self.unsup_gate_open():
            return
        gate = self.semiseg_modules['unsup_gate']
        n = batch.num_labeled
        if self._cache.get('t_logits') is not None and self._cache['t_labeled_rows'] == n:
            gate.update(self._cache['t_logits'][:n], self._labelled_target(batch))
        step, length = self.finetune_progress
        deadline = not self.in_pretraining and step >= self.unsup_gate_deadline * length
        reached = bool(gate.is_open)
        opened = reached or deadline
        if self.is_ddp:   # one decision for every rank: open only where all ranks' gates are
            flag = torch.tensor([int(opened)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            opened = bool(flag.item())
        if not opened:
            gate.is_open.fill_(False)   # under DDP a rank whose own gate opened waits for the others
            return
        gate.force_open()
        why = (f'every class reached the teacher Dice {gate.threshold} on the labelled rows' if reached else
               f'unsup_gate_deadline, {self.unsup_gate_deadline} of fine-tuning, passed')
        self.print_to_log_file(f'pseudo-label loss gate open at iteration {self.semiseg_step}: {why} '
                               f'(teacher Dice per foreground class, moving average: {gate.averages()})')

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if not self.unsup_gate_open():   # the gate's progress, so that a user sees a class the teacher has not found
            gate = self.semiseg_modules['unsup_gate']
            self.print_to_log_file(f'pseudo-label loss gate closed: teacher Dice per foreground class on the labelled '
                                   f'rows, moving average: {gate.averages()} (opens at {gate.threshold})')

    def on_train_end(self):
        if not self.unsup_gate_open():
            gate = self.semiseg_modules['unsup_gate']
            self.print_to_log_file(
                f'WARNING: the pseudo-label loss gate never opened: the teacher\'s Dice on the labelled rows stayed '
                f'under {gate.threshold} for some class (moving average per foreground class: {gate.averages()}), so '
                f'this run trained without the pseudo-label loss. A longer schedule, or unsup_gate_deadline < 1, lets '
                f'it in.')
        super().on_train_end()

    def _release_teacher_outputs(self) -> None:
        """Drop the teacher's logits and tapped features once the terms are computed: nothing reads them after, and
        the backward, the step's peak of memory, then runs without them."""
        self._cache.pop('t_logits', None)
        self._release_teacher_features()

    def _release_teacher_features(self) -> None:
        self._cache.pop('t_feats', None)
        for key in [k for k in self._features if k[0] == 'teacher']:
            del self._features[key]

    def current_tau_student(self) -> float:
        return self.tau_student

    def relational_terms(self, batch: SemiSegBatch):
        mods, teacher = self.semiseg_modules, self.teacher.module
        rows = slice(0, batch.num_labeled + (batch.data_weak.shape[0] if batch.has_unlabeled else 0))
        tau_s = self.current_tau_student()
        student_emb = mods['global_predictor'](mods['global_head'](self.student_features()['bottleneck'][rows]))
        student_local = mods['local_predictor'](mods['local_head'](batch.logits('all')[rows].float()))
        with torch.no_grad():
            teacher_emb = teacher['global_head'](self._cache['t_feats']['bottleneck'])
            teacher_local = teacher['local_head'](self._cache['t_logits'])
        return {'global_distillation': (self.lambda_global, mods['global_kl'](student_emb, teacher_emb, tau_s=tau_s)),
                'local_distillation': (self.lambda_local, mods['local_kl'](student_local, teacher_local, tau_s=tau_s))}

    def finetune_terms(self, batch: SemiSegBatch) -> Dict[str, Tuple[float, torch.Tensor]]:
        return {}

    # helpers for the fine-tuning terms
    def _labelled_target(self, batch: SemiSegBatch) -> torch.Tensor:
        """The labelled rows' full-resolution labels ``[B_l, *sp]`` long, nnU-Net's ignore label mapped to -1."""
        gt = batch.target_full_res[:, 0].long()
        if self.label_manager.has_ignore_label:
            gt = torch.where(gt == self.label_manager.ignore_label, torch.full_like(gt, -1), gt)
        return gt

    def _labels_probs_conf(self, batch: SemiSegBatch, with_probs: bool = True):
        """Full-resolution ``labels [B, *sp]`` (GT for labelled rows, ignore -> -1; pseudo-labels for unlabelled),
        teacher ``probs [B, C, *sp]`` (``None`` unless ``with_probs``) and ``confidence [B, *sp]`` (1 for labelled
        pixels)."""
        n = batch.num_labeled
        gt = self._labelled_target(batch)
        probs_l = self._cache['t_logits'][:n].softmax(1) if with_probs else None
        if not batch.has_unlabeled:
            return gt, probs_l, torch.ones_like(gt, dtype=torch.float32)
        probs = torch.cat((probs_l, self._cache['probs_u'])) if with_probs else None
        return (torch.cat((gt, self._cache['labels_u'])), probs,
                torch.cat((torch.ones_like(gt, dtype=torch.float32), self._cache['conf_u'])))

    def _student_representation(self, batch: SemiSegBatch, predictor: Optional[str] = None) -> RepresentationMap:
        """The student's representation map of the labelled and unlabelled rows, ``[B, D, *sp_rep]``, as a
        :class:`~nnunet_semiseg.heads.RepresentationMap`: the losses evaluate it (with gradient) only where they
        read it."""
        mods = self.semiseg_modules
        rows = slice(0, batch.num_labeled + (batch.data_weak.shape[0] if batch.has_unlabeled else 0))
        feats = self.student_features()
        return mods['rep_head'].represent([feats[i][rows] for i in self.tapped_decoder_stages],
                                          None if predictor is None else mods[predictor])

    def _teacher_features(self, rows: slice):
        return [self._cache['t_feats'][i][rows] for i in self.tapped_decoder_stages]

    @torch.no_grad()
    def _teacher_representation(self, num_labeled: int) -> torch.Tensor:
        """Teacher reps of the labelled and unlabelled rows (CutMix-ed like the student's input), ``[B, D, *sp_rep]``,
        no gradient."""
        teacher = self.teacher.module['rep_head'](self._teacher_features(slice(None)))   # channels-last memory
        if self._cache['box'] is not None:
            # pasted into the map's own unlabelled rows: no second whole map
            teacher[num_labeled:].copy_(_paste_like_cutmix(teacher[num_labeled:], self._cache['box']))
        return teacher


class PixelContrastMethod(nnUNetTrainerContrastiveBase):
    """MONA / ARCO fine-tuning (spec arco_mona.md §1.3, §3, §5): pixel/voxel contrast on FPN representations with
    anchors and negatives drawn by ``self.sampler``, the pseudo-label loss, the nearest-neighbour (diversity) loss
    and, in 2D, the equivariance loss. Weights: the papers' 0.01 / 1 / 1 / 1."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        spatial_dims = len(self.configuration_manager.patch_size)
        self.lambda_contrast, self.lambda_nn = 0.01, 1.0
        self.lambda_equivariance = 1.0 if spatial_dims == 2 else 0.0  # the 2D code's term; 0 in 3D (spec B9)
        # the equivariance rows' own forward after the first backward: same gradient, one graph's peak memory
        # (docs/benchmarks.md); False: one forward over all rows, as the released code runs it
        self.equivariance_second_pass = True
        self.contrast_temperature, self.num_queries, self.num_negatives = 0.5, 256, 512
        self.negative_mode = 'bank'          # the intended U2PL bank, fixed (spec §3.3 u2pl_fixed); or 'paper'
        self.negative_bank_size = 30000
        self.nn_bank_size, self.nn_topk = 36, 5
        self.loss_term_names = self.loss_term_names + ('contrast', 'nearest_neighbour', 'equivariance')

    def build_method_modules(self, network, num_classes):
        return {
            'rep_predictor': Predictor(network.encoder.conv_op, self.rep_dim),
            'pixel_contrast': PixelContrastLoss(num_classes, self.num_queries, self.num_negatives,
                                                self.contrast_temperature, negative_mode=self.negative_mode,
                                                rep_dim=self.rep_dim, bank_size=self.negative_bank_size,
                                                sampler=self.sampler, grid=self.sampler_grid),
            'nearest_neighbour': NearestNeighbourLoss(self.rep_dim, self.nn_bank_size, self.nn_topk),
            'equivariance': EquivarianceLoss(),
        }

    def prepare_student_input(self, data, data_weak, data_strong):
        x, rows = super().prepare_student_input(data, data_weak, data_strong)
        if not self.in_pretraining and self._cache['t_feats']:
            # the teacher's map is made before the student's forward, and the teacher's tapped features (52 MB on the
            # development plans) go with it: they would otherwise live beside the student's graph until the terms
            self._cache['t_rep'] = self._teacher_representation(data.shape[0])
            self._release_teacher_features()
        return x, rows

    def wants_second_pass(self) -> bool:
        return (not self.in_pretraining and self.lambda_equivariance > 0 and self.equivariance_second_pass
                and not self.rows_share_batch_statistics())

    def append_student_rows(self, x, rows):
        if self.lambda_equivariance <= 0:
            return x, rows
        eqv = self.semiseg_modules['equivariance']
        theta = eqv.make_transform(x.shape, None, device=x.device)
        self._cache['theta'] = theta
        if self.wants_second_pass():
            self._cache['equivariance_input'] = x       # warped and run in second_pass_terms
            return x, rows
        n = x.shape[0]
        return torch.cat((x, eqv.warp(x, theta))), dict(rows, equivariance=slice(n, 2 * n))

    def second_pass_terms(self):
        """The equivariance term: the student on the warped rows against the warped, detached first-pass logits."""
        eqv = self.semiseg_modules['equivariance']
        x, theta = self._cache.pop('equivariance_input'), self._cache['theta']
        target, mask = self._cache.pop('equivariance_target')
        output = self.forward_in_passes(self.network, eqv.warp(x, theta), 'student')
        logits = output[0] if isinstance(output, (list, tuple)) else output
        return {'equivariance': (self.lambda_equivariance, eqv(logits.float(), target, mask))}

    def finetune_terms(self, batch):
        mods = self.semiseg_modules
        n = batch.num_labeled
        labels, probs, conf = self._labels_probs_conf(batch)
        student = self._student_representation(batch, predictor='rep_predictor')
        teacher = self._cache.pop('t_rep')        # made in prepare_student_input
        low = torch.ones_like(labels, dtype=torch.bool)
        high = low.clone()
        if batch.has_unlabeled:
            step, length = self.finetune_progress
            low_u, high_u = entropy_masks(self._cache['probs_u'], entropy_alpha(step, length))
            low, high = torch.cat((low[:n], low_u)), torch.cat((high[:n], high_u))
        is_labeled = torch.arange(labels.shape[0], device=labels.device) < n
        terms = {'contrast': (self.lambda_contrast,
                              mods['pixel_contrast'](student, teacher, labels, probs, low, high, is_labeled))}
        if batch.has_unlabeled:
            # L_nn reads the spatial means of the maps only
            terms['nearest_neighbour'] = (self.lambda_nn, mods['nearest_neighbour'](
                student.spatial_mean()[n:], teacher[n:].flatten(2).mean(-1, dtype=torch.float32)))
        if self.lambda_equivariance > 0:
            eqv, theta = mods['equivariance'], self._cache['theta']
            base_rows = slice(0, labels.shape[0])
            target = eqv.warp(batch.logits('all')[base_rows].detach().float(), theta)
            mask = eqv.warp(eqv.confidence_mask(labels, conf), theta)
            if 'equivariance' in batch.rows:
                terms['equivariance'] = (self.lambda_equivariance,
                                         eqv(batch.logits('equivariance').float(), target, mask))
            else:
                self._cache['equivariance_target'] = (target, mask)
        return terms


class AnatomicalContrastMethod(nnUNetTrainerContrastiveBase):
    """ACTION fine-tuning (spec action.md §1.5, §2.3-2.4): anatomical contrast with hard queries (student
    probability < 0.97) and class-aware negatives on the representation head, plus the pseudo-label loss.
    ACTION++ adds adaptive supervised contrast and cosine temperatures (``use_ascl``, ``dynamic_tau``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 0.01                # the released code's weight (spec D3)
        self.anco_tau, self.num_queries, self.num_negatives = 0.5, 256, 512
        self.strong_threshold, self.weak_threshold = 0.97, 0.7
        # ACTION++ (off here, on in nnUNetTrainerACTIONpp)
        self.use_ascl = False
        self.dynamic_tau = False
        self.lambda_ascl, self.ascl_lambda_centre, self.ascl_queue_size, self.ascl_pixels_per_class = 0.01, 0.2, 12288, 256
        self.tau_min, self.tau_max, self.tau_period_fraction = 0.1, 1.0, 1.0
        self.loss_term_names = self.loss_term_names + ('anatomical_contrast', 'supervised_contrast')

    def build_method_modules(self, network, num_classes):
        modules = {'anatomical_contrast': AnatomicalContrastLoss(
            self.num_queries, self.num_negatives, self.anco_tau, self.strong_threshold,
            query_sampler=None if self.sampler == 'naive' else self.query_sampler())}
        if self.use_ascl:
            modules['supervised_contrast'] = AdaptiveSupervisedContrastLoss(
                num_classes, self.rep_dim, self.ascl_queue_size, self.ascl_lambda_centre)
        return modules

    def _tau(self, step: int, length: int, default: float) -> float:
        if not self.dynamic_tau:
            return default
        return cosine_tau(step, length, self.tau_min, self.tau_max, self.tau_period_fraction)

    def current_tau_student(self) -> float:
        # ACTION++ schedules the student temperature of the distillation; the teacher's stays sharp (spec §3.5)
        return self._tau(self.semiseg_step, max(1, self.pretrain_iterations), self.tau_student)

    def teacher_reads_labeled(self) -> bool:
        # fine-tuning reads the teacher on labelled rows only for ASCL's teacher features
        return self.in_pretraining or self.use_ascl

    def finetune_terms(self, batch):
        mods = self.semiseg_modules
        n = batch.num_labeled
        labels, _, conf = self._labels_probs_conf(batch, with_probs=False)
        student = self._student_representation(batch)
        size = student.spatial_size
        rows = slice(0, labels.shape[0])
        # nearest resizing selects pixels, so it commutes with the softmax: resize the logits, then normalise
        student_probs = resize_nearest(batch.logits('all')[rows].detach().float(), size).softmax(1)
        is_labeled = torch.arange(labels.shape[0], device=labels.device) < n
        valid = anco_valid_mask(conf, is_labeled, self.weak_threshold)
        labels_r, valid_r = resize_nearest(labels, size), resize_nearest(valid, size)
        step, length = self.finetune_progress
        terms = {'anatomical_contrast': (self.lambda_anco, mods['anatomical_contrast'](
            student, labels_r, student_probs, valid_r, tau=self._tau(step, length, self.anco_tau)))}
        if self.use_ascl:
            idx = sample_pixels_per_class(labels_r[:n], self.label_manager.num_segmentation_heads,
                                          self.ascl_pixels_per_class)
            f = student.at(idx)         # flat positions of the labelled rows = positions in the whole map
            with torch.no_grad():
                g = self.teacher.module['rep_head'].represent(self._teacher_features(slice(0, n))).at(idx)
            y = labels_r[:n].flatten()[idx]
            terms['supervised_contrast'] = (self.lambda_ascl, mods['supervised_contrast'](
                f, g, y, tau=self._tau(step, length, self.tau_min)))
        return terms
