"""The semi-supervised base trainer: nnU-Net's trainer plus an unlabelled stream, an EMA teacher and tapped
decoder features (design §4, §5). It does the plumbing once; a method's trainer only names its loss terms::

    class nnUNetTrainerMyMethod(nnUNetTrainerSemiSupervised):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.loss_term_names = ('consistency',)

        def compute_semisupervised_terms(self, batch):
            ...
            return {'consistency': (weight, value)}

What the base guarantees:

* one student forward over ``cat(labelled, unlabelled strong view)`` per step (two forwards before one backward
  break DDP); the supervised loss is nnU-Net's own ``self.loss`` on the labelled part, deep supervision included.
  A trainer may add a *second pass* (:meth:`~nnUNetTrainerSemiSupervised.second_pass_terms`): rows whose terms
  read the first pass only without gradient run after its backward, so the step's gradient is the same and its
  peak memory holds one graph instead of both (MONA's equivariance rows, Mean Teacher's unlabelled rows);
* on the CPU each forward (student and teacher) runs over at most the plans' batch size of rows at a time and
  concatenates the outputs (``rows_per_pass``): instance norm keeps rows independent, so the losses and gradients
  are the one-forward ones, and on a 2-core CPU a pass over 8 rows costs 8-14 % more than two over 4, so Mean
  Teacher's and ARCO's steps run 1-3 % faster and Mean Teacher's peak memory is 12 % lower (docs/benchmarks.md,
  "Network passes no larger than plain's batch");
* the teacher (:class:`~nnunet_semiseg.teacher.EMATeacher`) lives outside ``self.network``, so
  ``network_weights`` in every checkpoint is exactly what nnU-Net's ``build_network_architecture`` builds and plain
  ``nnUNetv2_predict`` loads it; the teacher also averages the modules named in ``ema_module_names``;
* decoder features are tapped with forward hooks on ``decoder.stages`` (PlainConvUNet, ResidualEncoderUNet), on
  the student and on the teacher, registered before the first forward (so they also work under torch.compile);
* extra trainable modules (projection heads) join nnU-Net's optimizer as a second parameter group and are
  clipped with the network; under DDP their gradients are all-reduced (they sit outside the DDP wrapper);
* nnU-Net's AMP path (autocast and grad scaler on CUDA only);
* a step whose loss or any term is not finite is skipped (no backward, optimizer or teacher update, every other
  buffer put back; all DDP ranks together), logged with the failing term and the batch's cases; the feature banks
  keep the teacher features the step pushed, as MoCo-style queues do when a grad scaler skips a step (they are
  finite, :class:`~nnunet_semiseg.contrast.memory.FeatureQueue`; ``restore_banks_on_skip = True`` puts them back too,
  at the cost of a copy of every bank held through each step); after
  ``max_consecutive_nonfinite_steps`` (10) in a row training stops with :class:`NonFiniteLossError`;
* every loss term is logged once per epoch and drawn into ``progress.png``;
* validation and ``checkpoint_best`` see labelled cases only (nnU-Net's split never contains unlabelled cases);
* teacher, extra modules (queues included) and the step counter are saved under ``semiseg_state`` and restored
  by ``--c``; checkpoints are written atomically, so a kill during a save never corrupts ``checkpoint_latest``.

Inference uses the student (``network_weights``), as MONA/ARCO/ACTION evaluate; ``nnunet-semiseg export
--weights teacher`` writes a model folder predicting with the EMA teacher instead.
"""
import os
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_semiseg.contrast.memory import FeatureQueue
from nnunet_semiseg.teacher import EMATeacher
from nnunet_semiseg.training.logging import NONFINITE_LOG_KEY, SemiSegLocalLogger
from nnunet_semiseg.unlabeled.dataloader import UnlabeledDataLoader, strong_transforms, weak_transforms
from nnunet_semiseg.unlabeled.preprocess import (MANIFEST, ensure_unlabeled_preprocessed,
                                                 unlabeled_preprocessed_folder)

Output = Union[torch.Tensor, List[torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """Training stopped: too many consecutive steps had a non-finite loss. The message names the term, the step and
    the last batch's cases."""


def _weighted_sum(start: torch.Tensor, terms: Dict[str, Tuple[float, torch.Tensor]]) -> torch.Tensor:
    total = start
    for weight, value in terms.values():
        total = total + weight * value
    return total


def _scalar(value) -> np.float32:
    """A loss value as a numpy scalar (a Python object, no tensor or C buffer behind it)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()  # a loss still holds its graph; float() of it warns
    return np.float32(float(value))  # float() reads a 0-d tensor's value (any dtype) or takes a Python number


def stop_loaders(trainer) -> None:
    """Stop the worker processes of a trainer's data loaders (training, validation, unlabelled), for code that drives
    steps outside ``run_training`` (benchmarks, tests): they would otherwise outlive it (and hold its stdout open)."""
    for name in ('dataloader_train', 'dataloader_val', 'dataloader_unlabeled'):
        loader = getattr(trainer, name, None)
        if hasattr(loader, '_finish'):
            loader._finish()


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network inside DDP and/or torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


@dataclass
class SemiSegBatch:
    """What one training step hands to :meth:`nnUNetTrainerSemiSupervised.compute_semisupervised_terms`.

    ``output`` is the student's output over ``student_input`` (a list, highest resolution first, when deep
    supervision is on); ``rows`` names the row ranges of that input (``'labeled'`` first, then ``'unlabeled'`` and
    whatever :meth:`~nnUNetTrainerSemiSupervised.prepare_student_input` added). ``data_weak`` / ``data_strong`` are
    ``None`` when the dataset has no unlabelled images.
    """
    data: torch.Tensor                      # [B_l, C, *patch] labelled images
    target: Output                          # nnU-Net's target(s) for them
    output: Output                          # student output, rows as in `rows`
    rows: Dict[str, slice]
    data_weak: Optional[torch.Tensor]       # [B_u, C, *patch] teacher view of the unlabelled patches
    data_strong: Optional[torch.Tensor]     # [B_u, C, *patch] student view (same geometry)

    @property
    def num_labeled(self) -> int:
        return self.data.shape[0]

    @property
    def has_unlabeled(self) -> bool:
        return self.data_weak is not None

    def logits(self, part: str = 'all') -> torch.Tensor:
        """Full-resolution student logits ``[B, K, *patch]`` of the rows ``part`` ('all' or a key of ``rows``)."""
        out = self.output[0] if isinstance(self.output, (list, tuple)) else self.output
        if part == 'all':
            return out
        if part not in self.rows:
            raise KeyError(f'no rows named {part!r}; this step has {list(self.rows)}')
        return out[self.rows[part]]

    @property
    def target_full_res(self) -> torch.Tensor:
        """The labelled target at full resolution, ``[B_l, 1, *patch]``."""
        return self.target[0] if isinstance(self.target, (list, tuple)) else self.target


class nnUNetTrainerSemiSupervised(nnUNetTrainer):
    """nnU-Net trainer with an unlabelled stream, an EMA teacher and decoder taps; supervised loss only until a
    subclass adds terms in :meth:`compute_semisupervised_terms`. See the module docstring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # hyper-parameters: set after super().__init__, like nnU-Net's own variants, so subclasses can change them
        self.ema_decay = 0.99
        self.ema_warmup = True              # Mean Teacher's min(decay, 1 - 1/(n+1))
        self.unlabeled_batch_size = None    # None: the labelled (per-rank) batch size
        self.tapped_decoder_stages: Tuple[int, ...] = ()  # decoder.stages indices whose outputs are kept
        self.tap_bottleneck = False         # keep the last encoder stage's output too
        self.loss_term_names: Tuple[str, ...] = ()
        self.ema_module_names: Tuple[str, ...] = ()  # semiseg_modules the teacher averages (teacher heads)
        self.unlabeled_num_processes = None  # preprocessing workers; None: nnU-Net's default_num_processes
        self.max_consecutive_nonfinite_steps = 10  # skipped steps in a row before training stops
        # True: a skipped step also puts the feature banks back, from a copy taken at every step's start (61 MB on
        # the development plans, alive at the step's peak); False: they keep the finite teacher features it pushed
        self.restore_banks_on_skip = False
        # rows one network pass runs at once: 'auto' = the plans' batch size on the CPU and every row in one pass on a
        # GPU (where a larger batch costs less per row); None = one pass; an int = that many. Never split under DDP
        # (one forward per backward) or with batch statistics (rows would no longer be independent)
        self.rows_per_pass: Union[str, int, None] = 'auto'

        self.teacher: Optional[EMATeacher] = None
        self.semiseg_modules = nn.ModuleDict()
        self.dataloader_unlabeled = None
        self.num_unlabeled_cases = 0
        self.semiseg_step = 0               # iterations run, skipped ones included (schedules follow nnU-Net's epochs)
        self.nonfinite_steps_skipped = 0    # over the whole run (checkpointed)
        self._nonfinite_in_a_row = 0
        self._student_bundle: Optional[nn.ModuleDict] = None
        self._features: Dict[Tuple[str, object], torch.Tensor] = {}
        self._teacher_restored = False
        self._batch_statistics: Optional[bool] = None

        local = SemiSegLocalLogger()
        local.my_fantastic_logging = self.logger.local_logger.my_fantastic_logging
        self.logger.local_logger = local

    # ------------------------------------------------------------------ what subclasses override
    def build_semiseg_modules(self, network: nn.Module) -> Dict[str, nn.Module]:
        """Extra modules (projection heads, queues, loss modules with buffers) built once the network exists.
        Trainable parameters among them join the optimizer; all of them are checkpointed."""
        return {}

    def prepare_student_input(self, data: torch.Tensor, data_weak: Optional[torch.Tensor],
                              data_strong: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, slice]]:
        """The rows of the one student forward and their names: labelled first, then the strong unlabelled view.
        Subclasses may run the teacher here (pseudo-labels for mixing) or append rows (an equivariance view);
        everything goes through one forward, which DDP requires."""
        n = data.shape[0]
        if data_strong is None:
            return data, {'labeled': slice(0, n)}
        return torch.cat((data, data_strong)), {'labeled': slice(0, n),
                                                'unlabeled': slice(n, n + data_strong.shape[0])}

    def compute_semisupervised_terms(self, batch: SemiSegBatch) -> Dict[str, Tuple[float, torch.Tensor]]:
        """``{name: (weight, value)}``; the step minimises ``supervised + sum(weight * value)`` and logs ``value``."""
        return {}

    # ------------------------------------------------------------------ network side
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def student_network(self) -> nn.Module:
        return unwrap_network(self.network)

    def configure_optimizers(self):
        # initialize() calls this right after building (and compiling) the network and before the DDP wrap: the
        # one place where extra modules can join nnU-Net's own optimizer without re-implementing initialize().
        student = self.student_network()
        self.semiseg_modules = nn.ModuleDict(self.build_semiseg_modules(student)).to(self.device)
        self._student_bundle = nn.ModuleDict({'network': student,
                                              **{n: self.semiseg_modules[n] for n in self.ema_module_names}})
        # deepcopy before any hook is registered (a deepcopy copies hooks)
        self.teacher = EMATeacher(self._student_bundle, self.ema_decay, self.ema_warmup).to(self.device)
        self.teacher.module['network'].decoder.deep_supervision = False
        self._register_taps(student, 'student')
        self._register_taps(self.teacher.module['network'], 'teacher')

        optimizer, lr_scheduler = super().configure_optimizers()
        extra = [p for p in self.semiseg_modules.parameters() if p.requires_grad]
        if extra:
            optimizer.add_param_group({'params': extra})  # PolyLR sets the lr of every group
        return optimizer, lr_scheduler

    def _register_taps(self, network: nn.Module, role: str) -> None:
        if not self.tapped_decoder_stages and not self.tap_bottleneck:
            return
        if not hasattr(network, 'decoder') or not hasattr(network.decoder, 'stages'):
            raise RuntimeError(
                f'{self.__class__.__name__} taps decoder features, which needs a U-Net with decoder.stages '
                f'(PlainConvUNet, ResidualEncoderUNet); the plans use {network.__class__.__name__}. Use plans '
                f'with one of those architectures.')
        for i in self.tapped_decoder_stages:
            network.decoder.stages[i].register_forward_hook(partial(self._store_feature, (role, i)))
        if self.tap_bottleneck:
            network.encoder.stages[-1].register_forward_hook(partial(self._store_feature, (role, 'bottleneck')))

    def _store_feature(self, key, module, inputs, output):
        self._features[key] = output

    def student_features(self) -> Dict[object, torch.Tensor]:
        """Tapped student features of the last forward: ``{stage index or 'bottleneck': [B, C_i, *spatial_i]}``,
        rows in the order of the forward's batch (labelled first)."""
        return {k: v for (role, k), v in self._features.items() if role == 'student'}

    def teacher_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[object, torch.Tensor]]:
        """Teacher logits ``[B, K, *patch]`` (full resolution, no gradient) and its tapped features."""
        with torch.no_grad():
            logits = self.forward_in_passes(self.teacher.module['network'], x, 'teacher')
        feats = {k: v for (role, k), v in self._features.items() if role == 'teacher'}
        return logits, feats

    def pass_rows(self) -> Optional[int]:
        """How many rows one network pass runs at once (None: all), from ``rows_per_pass``."""
        if self.is_ddp or self.rows_share_batch_statistics():
            return None
        if self.rows_per_pass == 'auto':
            return self.batch_size if self.device.type == 'cpu' else None
        if self.rows_per_pass is not None and (not isinstance(self.rows_per_pass, int) or self.rows_per_pass < 1):
            raise ValueError(f"{self.__class__.__name__}.rows_per_pass must be 'auto', None or a positive int, "
                             f"not {self.rows_per_pass!r}")
        return self.rows_per_pass

    def forward_in_passes(self, network: nn.Module, x: torch.Tensor, role: str) -> Output:
        """``network(x)`` run over at most :meth:`pass_rows` rows at a time: outputs (every deep-supervision level)
        and the ``role``'s tapped features concatenated along the rows, so callers see one forward's results."""
        rows = self.pass_rows()
        if rows is None or x.shape[0] <= rows:
            return network(x)
        outputs, taps = [], []
        for part in x.split(rows):
            outputs.append(network(part))
            taps.append({k: v for k, v in self._features.items() if k[0] == role})
        self._features.update({k: torch.cat([t[k] for t in taps]) for k in taps[0]})
        del taps
        if isinstance(outputs[0], (list, tuple)):
            return [torch.cat(level) for level in zip(*outputs)]
        return torch.cat(outputs)

    def _trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.network.parameters()) + [p for p in self.semiseg_modules.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ data side
    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return dl_tr, dl_val

    def _prepare_unlabeled_folder(self) -> Tuple[str, int]:
        from nnunetv2.configuration import default_num_processes
        from nnunetv2.paths import nnUNet_raw
        folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                               self.configuration_manager.data_identifier)
        raw = os.path.join(str(nnUNet_raw), self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        if raw is None or not os.path.isdir(raw):
            # only the preprocessed data travelled (e.g. to a GPU node): use what is there
            n = len(nnUNetDatasetBlosc2.get_identifiers(folder)) if os.path.isfile(os.path.join(folder, MANIFEST)) else 0
            if n:
                self.print_to_log_file(f'raw dataset not found: using the {n} preprocessed unlabelled cases in {folder}')
            return folder, n
        n_proc = self.unlabeled_num_processes or default_num_processes
        return ensure_unlabeled_preprocessed(raw, self.preprocessed_dataset_folder_base, self.plans_manager,
                                             self.configuration_manager, self.dataset_json,
                                             num_processes=n_proc, log=self.print_to_log_file)

    def get_unlabeled_dataloader(self):
        """The unlabelled augmenter (``None`` with a warning when the dataset has no ``imagesTrUnlabeled/``)."""
        if self.local_rank == 0:
            folder, n = self._prepare_unlabeled_folder()
        if self.is_ddp:
            dist.barrier()  # rank 0 preprocesses once, the others wait
        if self.local_rank != 0:
            folder = unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                                   self.configuration_manager.data_identifier)
            n = len(nnUNetDatasetBlosc2.get_identifiers(folder)) if os.path.isdir(folder) else 0
        self.num_unlabeled_cases = n
        if n == 0:
            msg = (f'{self.plans_manager.dataset_name} has no unlabelled images (imagesTrUnlabeled/ in its raw folder): '
                   f'{self.__class__.__name__} trains with its supervised terms only.')
            warnings.warn(msg)
            self.print_to_log_file('WARNING: ' + msg)
            return None
        self.print_to_log_file(f'unlabelled stream: {n} cases from {folder}')
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        patch_size = self.configuration_manager.patch_size
        loader = UnlabeledDataLoader(
            nnUNetDatasetBlosc2(folder), self.unlabeled_batch_size or self.batch_size, initial_patch_size,
            patch_size, self.label_manager,
            weak_transforms(patch_size, rotation, mirror_axes, dummy_2d, self.configuration_manager.use_mask_for_norm),
            strong_transforms(dummy_2d))
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            augmenter = SingleThreadedAugmenter(loader, None)
        else:
            augmenter = NonDetMultiThreadedAugmenter(loader, None, max(1, n_proc // 2), num_cached=max(3, n_proc // 4),
                                                     seeds=None, pin_memory=self.device.type == 'cuda',
                                                     wait_time=0.002)
        next(augmenter)  # start the workers now, like nnU-Net does for its own loaders
        return augmenter

    # ------------------------------------------------------------------ training loop
    def on_train_start(self):
        super().on_train_start()
        if not self._teacher_restored:
            # after DDP's broadcast of rank 0's weights and after -pretrained_weights: teacher = student everywhere
            self.teacher.copy_from(self._student_bundle)
        self.logger.local_logger.add_terms(('supervised',) + tuple(self.loss_term_names), self.current_epoch)
        self.logger.local_logger.add_series(NONFINITE_LOG_KEY, self.current_epoch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.semiseg_modules.train()

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        data_weak = data_strong = None
        case_ids = {'labelled': list(batch.get('keys', [])), 'unlabelled': []}
        if self.dataloader_unlabeled is not None:
            unlabeled = next(self.dataloader_unlabeled)
            data_weak = unlabeled['data_weak'].to(self.device, non_blocking=True)
            data_strong = unlabeled['data_strong'].to(self.device, non_blocking=True)
            case_ids['unlabelled'] = list(unlabeled.get('keys', []))

        # loss modules push into their banks/queues (and update centroids) inside forward; a skipped step puts them
        # back. A copy of every buffer (banks: tens of MB) is cheaper than a forward and needs no module's help.
        saved_buffers = self._buffer_snapshot()
        self.optimizer.zero_grad(set_to_none=True)
        second_pass = self.wants_second_pass()
        # with a second pass the first backward accumulates locally; the second's all-reduce carries both under DDP
        with self.network.no_sync() if second_pass and self.is_ddp else dummy_context():
            with self._autocast():
                supervised, terms = self.step_losses(data, target, data_weak, data_strong)
                total = _weighted_sum(supervised, terms)
            failed = self._nonfinite_terms(supervised, terms, total)
            if second_pass and not failed:
                self._backward(total)        # frees the first pass's graph before the second forward
        if second_pass and not failed:
            self._features.clear()
            with self._autocast():
                more = self.second_pass_terms()
                extra = _weighted_sum(torch.zeros((), device=self.device), more)
            failed = self._nonfinite_terms(supervised, more, extra)
            terms.update(more)
            total = total.detach() + extra

        if failed:
            self.optimizer.zero_grad(set_to_none=True)   # a first pass's gradients go with the step
            self._restore_buffers(saved_buffers)
            self._skip_nonfinite_step(failed, case_ids)
        else:
            self._nonfinite_in_a_row = 0
            self._optimizer_step(extra if second_pass else total)
            self.teacher.update(self._student_bundle)
        self.semiseg_step += 1
        # numpy scalars, not arrays over torch tensors: nnU-Net keeps every step's outputs until the epoch ends, and
        # a few small C allocations kept per step pin glibc's heap between the step's large freed tensors, so the
        # peak memory grew over each epoch (Mean Teacher: about 1 GB in 250 steps; docs/benchmarks.md)
        out = {'loss': _scalar(total), 'supervised': _scalar(supervised), 'nonfinite_skipped': bool(failed)}
        # every step reports every term (NaN when inactive): nnU-Net collates the outputs of an epoch by the keys of
        # its first step, and a phase switch or a missing unlabelled stream must not change the keys mid-epoch
        out.update({name: np.float32(np.nan) for name in self.loss_term_names})
        out.update({k: _scalar(v) for k, (_, v) in terms.items()})
        return out

    def step_losses(self, data: torch.Tensor, target: Output, data_weak: Optional[torch.Tensor],
                    data_strong: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Tuple[float, torch.Tensor]]]:
        """The one student forward of a step and its losses: ``(supervised, {name: (weight, value)})``, not yet
        summed. Tensors already on the device; no backward, optimizer or teacher update (benchmarks/term_gradients.py
        takes each term's gradient from it)."""
        self._features.clear()
        x, rows = self.prepare_student_input(data, data_weak, data_strong)
        output = self.forward_in_passes(self.network, x, 'student')
        n = data.shape[0]
        output_labeled = [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]
        supervised = self.loss(output_labeled, target)
        terms = self.compute_semisupervised_terms(SemiSegBatch(data, target, output, rows, data_weak, data_strong))
        return supervised, terms

    def wants_second_pass(self) -> bool:
        """Whether this step runs :meth:`second_pass_terms` after the backward of the first pass (none by default)."""
        return False

    def second_pass_terms(self) -> Dict[str, Tuple[float, torch.Tensor]]:
        """Terms whose student rows run in a forward of their own, after the first pass's backward has freed its
        graph: ``{name: (weight, value)}``. Only for terms that read nothing of the first pass with gradient (targets
        detached), so the summed gradient is the one-pass gradient while the peak memory holds one graph, not both."""
        return {}

    def rows_share_batch_statistics(self) -> bool:
        """Whether the student normalises with batch statistics (BatchNorm): then its rows couple within a forward
        and must not be split into passes. nnU-Net's networks use instance norm."""
        if self._batch_statistics is None:
            self._batch_statistics = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                         for m in self.student_network().modules())
        return self._batch_statistics

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _optimizer_step(self, total: torch.Tensor) -> None:
        """Backward of ``total`` (added to what a first pass left in ``.grad``), then nnU-Net's clip and step."""
        params = self._trainable_parameters()
        if total.requires_grad:          # a second pass with no terms leaves a constant: the first pass's grads stand
            self._backward(total)
        self._allreduce_semiseg_grads()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    # ------------------------------------------------------------------ non-finite steps
    def _buffer_snapshot(self) -> Dict[str, torch.Tensor]:
        """Copies of every buffer a forward may change: loss modules' centroids (and their feature banks and queues
        when ``restore_banks_on_skip``), and the student's normalisation statistics (none for nnU-Net's
        InstanceNorm). The teacher's change only in its EMA update."""
        banks = () if self.restore_banks_on_skip else tuple(
            f'{name}.' for name, m in self.semiseg_modules.named_modules() if isinstance(m, FeatureQueue))
        named = [(f'modules.{k}', v) for k, v in self.semiseg_modules.named_buffers() if not k.startswith(banks)]
        named += [(f'network.{k}', v) for k, v in self.student_network().named_buffers()]
        return {k: v.detach().clone() for k, v in named}

    @torch.no_grad()
    def _restore_buffers(self, saved: Dict[str, torch.Tensor]) -> None:
        current = {f'modules.{k}': v for k, v in self.semiseg_modules.named_buffers()}
        current.update({f'network.{k}': v for k, v in self.student_network().named_buffers()})
        for k, v in saved.items():
            current[k].copy_(v)

    def _nonfinite_terms(self, supervised: torch.Tensor, terms: Dict[str, Tuple[float, torch.Tensor]],
                         total: torch.Tensor) -> List[str]:
        """Names of the non-finite parts of this step's loss (``'supervised'``, term names, else ``'total'`` when
        only the weighted sum overflowed); the same on every DDP rank, so all ranks skip together."""
        names = ['supervised'] + list(terms) + ['total']
        values = [supervised] + [torch.as_tensor(v, device=self.device) for _, v in terms.values()] + [total]
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values]).float()
        if self.is_ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        flags = bad.cpu().tolist()
        failed = [n for n, f in zip(names, flags) if f > 0]
        return [n for n in failed if n != 'total'] or failed

    def _skip_nonfinite_step(self, failed: List[str], case_ids: Dict[str, list]) -> None:
        self._nonfinite_in_a_row += 1
        self.nonfinite_steps_skipped += 1
        cases = f'labelled cases {case_ids["labelled"]}, unlabelled cases {case_ids["unlabelled"]}'
        self.print_to_log_file(
            f'WARNING: non-finite {", ".join(failed)} loss at step {self.semiseg_step} (epoch {self.current_epoch}; '
            f'{cases}): step skipped, no optimizer or teacher update ({self._nonfinite_in_a_row} in a row, '
            f'{self.nonfinite_steps_skipped} in this run)')
        if self._nonfinite_in_a_row >= self.max_consecutive_nonfinite_steps:
            raise NonFiniteLossError(
                f'{self._nonfinite_in_a_row} consecutive training steps had a non-finite {", ".join(failed)} loss '
                f'(last: step {self.semiseg_step}, epoch {self.current_epoch}; {cases}); training stopped. Check '
                f'those cases (nnUNetv2_plan_and_preprocess --verify_dataset_integrity, nnunet-semiseg '
                f'preprocess-unlabeled) or lower the learning rate, then continue from checkpoint_latest.pth with '
                f'--c.')

    def _allreduce_semiseg_grads(self) -> None:
        # heads live outside the DDP wrapper, so DDP does not average their gradients
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for p in self.semiseg_modules.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        skipped = sum(bool(o.get('nonfinite_skipped', False)) for o in train_outputs)  # equal on every DDP rank
        # skipped steps changed nothing, so the epoch's means leave them out (unless every step was skipped)
        train_outputs = [o for o in train_outputs if not o.get('nonfinite_skipped', False)] or train_outputs
        super().on_train_epoch_end(train_outputs)
        self.logger.log(NONFINITE_LOG_KEY, skipped, self.current_epoch)
        if skipped:
            self.print_to_log_file(f'non-finite steps skipped this epoch: {skipped} '
                                   f'({self.nonfinite_steps_skipped} in this run)')
        summary = []
        for name in ('supervised',) + tuple(self.loss_term_names):
            values = np.array([float(np.mean(o[name])) for o in train_outputs if name in o])
            values = values[np.isfinite(values)]  # steps where the term was inactive report NaN
            value = float(values.mean()) if values.size else float('nan')
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            self.logger.log(f'train_{name}', value, self.current_epoch)
            summary.append(f'{name} {value:.4f}')
        self.print_to_log_file('loss terms: ' + ', '.join(summary))

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ------------------------------------------------------------------ checkpoints
    def semiseg_state_dict(self) -> dict:
        return {'format': 1, 'teacher': self.teacher.state_dict(), 'modules': self.semiseg_modules.state_dict(),
                'step': self.semiseg_step, 'trainer': self.__class__.__name__,
                'nonfinite_steps_skipped': self.nonfinite_steps_skipped}

    def load_semiseg_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state['teacher'])
        self.semiseg_modules.load_state_dict(state['modules'])
        self.semiseg_step = int(state['step'])
        self.nonfinite_steps_skipped = int(state.get('nonfinite_steps_skipped', 0))
        self._teacher_restored = True

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's keys unchanged (network_weights = the student only), plus semiseg_state; written to a temporary
        # file and renamed, so a kill mid-save leaves the previous checkpoint intact for --c
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        checkpoint = {
            'network_weights': self.student_network().state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            'semiseg_state': self.semiseg_state_dict(),
        }
        tmp = filename + '.tmp'
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError(f'{self.__class__.__name__}.load_checkpoint expects a checkpoint file path')
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get('semiseg_state')
        if state is None:
            self.print_to_log_file(f'{filename_or_checkpoint} has no semi-supervised state (written by another '
                                   f'trainer?): the teacher starts from the loaded network')
            self.teacher.copy_from(self._student_bundle)
        else:
            self.load_semiseg_state_dict(state)
        self.logger.local_logger.add_terms(('supervised',) + tuple(self.loss_term_names), self.current_epoch)
        self.logger.local_logger.add_series(NONFINITE_LOG_KEY, self.current_epoch)
