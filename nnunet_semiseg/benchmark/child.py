"""One benchmark run in its own process: ``python -m nnunet_semiseg.benchmark.child RUN_DIR/spec.json``.

The parent sets ``nnUNet_results=RUN_DIR``, so nnU-Net writes the model folder under the benchmark's output and
this process' peak memory is the run's own. Steps:

1. seed Python, numpy and torch, and replace the data-augmentation workers' augmenter (nnU-Net's
   ``NonDetMultiThreadedAugmenter`` with ``seeds=None``: OS-entropy numpy seeds, batches in arrival order) by
   batchgenerators' ``MultiThreadedAugmenter`` with per-worker seeds derived from the run's seed (numpy, torch and
   Python RNGs of each worker) and batches in a fixed worker order; with ``nnUNet_n_proc_DA=0`` augmentation runs
   in this process on the seeded RNGs;
2. build the trainer as ``nnUNetv2_train`` does (trainer class by name, plans, fold, dataset.json), set the
   schedule (``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``) as nnU-Net's own
   variants do, save ``checkpoint_latest`` after every epoch, and continue like ``nnUNetv2_train --c``:
   ``checkpoint_final`` means training is done, else ``checkpoint_latest`` is loaded; then ``run_training()``
   (nnU-Net's loop; its final sliding-window validation is skipped, the benchmark predicts itself);
3. predict the evaluation cases with nnU-Net's predictor from ``checkpoint_final``, no TTA, and evaluate them with
   :func:`nnunet_semiseg.evaluation.evaluate_folder`;
4. write ``RUN_DIR/run.json`` (the run's record) last, atomically: its presence means the run is finished.
"""
import hashlib
import json
import os
import random
import resource
import sys
import time
from typing import Optional

import numpy as np

PROGRESS = '[benchmark]'


def log(message: str) -> None:
    print(f'{PROGRESS} {message}', flush=True)


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


# ---------------------------------------------------------------------------------------------- seeded workers
class _SeededWorkerLoader:
    """Wraps a data loader so that each augmentation worker seeds torch and Python's RNG (batchgenerators seeds only
    numpy) and runs single-threaded, as nnU-Net's own worker function does."""

    def __init__(self, loader, seeds):
        object.__setattr__(self, '_loader', loader)
        object.__setattr__(self, '_seeds', list(seeds))

    def __getattr__(self, name):
        if name in ('_loader', '_seeds'):
            raise AttributeError(name)
        return getattr(self._loader, name)

    def __setattr__(self, name, value):
        setattr(self._loader, name, value)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._loader)

    def set_thread_id(self, thread_id: int) -> None:
        import torch
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(1)
        torch.manual_seed(self._seeds[thread_id])
        random.seed(self._seeds[thread_id])
        threadpool_limits(1)
        self._loader.set_thread_id(thread_id)


def install_seeded_augmenters(seed: int) -> None:
    """Make every ``NonDetMultiThreadedAugmenter`` that nnU-Net's trainer and our semi-supervised base create (in
    that order: training, validation, unlabelled) a seeded, order-preserving ``MultiThreadedAugmenter``."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    counter = [0]

    class SeededAugmenter(MultiThreadedAugmenter):
        def __init__(self, data_loader, transform, num_processes, num_cached=2, seeds=None, pin_memory=False,
                     wait_time=0.02):
            if seeds is None:
                seeds = [(seed * 1_000_003 + 7919 * counter[0] + i) % (2 ** 32) for i in range(num_processes)]
                counter[0] += 1
            super().__init__(_SeededWorkerLoader(data_loader, seeds), transform, num_processes,
                             num_cached_per_queue=max(2, -(-num_cached // num_processes)), seeds=seeds,
                             pin_memory=pin_memory, wait_time=wait_time)

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    import nnunet_semiseg.training.base as semiseg_base_module
    for module in (nnunet_trainer_module, semiseg_base_module):
        if hasattr(module, 'NonDetMultiThreadedAugmenter'):
            module.NonDetMultiThreadedAugmenter = SeededAugmenter


# ---------------------------------------------------------------------------------------------- timing
def machine_fingerprint(device) -> dict:
    """What sets a run's floating-point path, beyond code and seed: the CPU (model, and a hash of its feature flags,
    which decide torch's kernels), torch's CPU kernel level, the thread count (how reductions split), torch's version
    and the GPU. Same seed on machines with equal fingerprints: the same Dice (plain nnU-Net's seeds 0-2 on real
    ACDC repeated to every printed digit on two machines of one kind); on another kind: several Dice apart."""
    import platform

    import torch
    model, flags = '', ''
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                key, _, value = (part.strip() for part in line.partition(':'))
                if key == 'model name' and not model:
                    model = value
                elif key in ('flags', 'Features') and not flags:
                    flags = ' '.join(sorted(value.split()))
    except OSError:  # not Linux: platform's name is what there is
        pass
    cpu = model or platform.processor() or platform.machine()
    fingerprint = {'cpu': cpu, 'cpu_flags_sha1': hashlib.sha1(flags.encode()).hexdigest()[:12] if flags else None,
                   'torch_cpu_capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(),
                   'torch': torch.__version__}
    if device.type == 'cuda':
        fingerprint['gpu'] = torch.cuda.get_device_name(device)
    return fingerprint


class RunTimer:
    """Training time and seconds per iteration per phase, kept in ``timing.json`` across interruptions.

    Phase: ``pretrain`` / ``finetune`` for trainers with a two-stage schedule (``in_pretraining``), else ``train``.
    An iteration lasts from the end of the previous training step (or the epoch's start) to the end of this one.

    Memory, to tell when a run's peak is reached (a peak that grows over a run is not a peak of one step):
    ``memory_by_epoch`` holds per epoch the peak after its last training step (``train_peak_mb``), the peak after
    validation and checkpointing (``epoch_peak_mb``) and the memory held at its end (``rss_mb``, VmRSS on Linux);
    ``peak_rises`` lists where the peak rose by ``PEAK_RISE_MB`` or more since the last entry (epoch, training step
    within it, or ``'epoch_end'``: validation, logging, checkpoint)."""

    PEAK_RISE_MB = 32.0

    def __init__(self, path: str, trainer, device):
        self.path, self.trainer, self.device = path, trainer, device
        self.state = {'train_wall_s': 0.0, 'epochs_done': 0, 'phases': {}, 'segments': 0, 'peak_memory_mb': 0.0,
                      'machines': [], 'memory_by_epoch': [], 'peak_rises': []}
        if os.path.isfile(path):
            with open(path) as fh:
                self.state.update(json.load(fh))
        self.state['segments'] += 1
        self._epoch_start = self._last_end = None
        self._last_print = 0.0
        self._step_in_epoch = 0
        self._train_peak = 0.0
        rises = self.state['peak_rises']
        self._last_rise = rises[-1]['peak_mb'] if rises else 0.0
        self._machine = machine_fingerprint(device)
        self._train_step = trainer.train_step
        self._on_train_epoch_start = trainer.on_train_epoch_start
        self._on_epoch_end = trainer.on_epoch_end
        trainer.train_step = self.train_step
        trainer.on_train_epoch_start = self.on_train_epoch_start
        trainer.on_epoch_end = self.on_epoch_end

    def phase(self) -> str:
        if hasattr(self.trainer, 'pretrain_iterations'):
            return 'pretrain' if getattr(self.trainer, 'in_pretraining', False) else 'finetune'
        return 'train'

    def _sync(self):
        if self.device.type == 'cuda':
            import torch
            torch.cuda.synchronize()

    def on_train_epoch_start(self):
        self._epoch_start = self._last_end = time.perf_counter()
        self._step_in_epoch = 0
        return self._on_train_epoch_start()

    def _note_peak(self, epoch: int, where) -> float:
        """Record ``(epoch, where)`` (epochs counted from 1) if the peak rose by ``PEAK_RISE_MB`` since the last
        record; returns the peak."""
        peak = peak_memory_mb(self.device)
        if peak - self._last_rise >= self.PEAK_RISE_MB:
            self.state['peak_rises'].append({'epoch': epoch, 'where': where,
                                             'peak_mb': peak})
            self._last_rise = peak
        return peak

    def train_step(self, batch):
        phase = self.phase()
        out = self._train_step(batch)
        self._sync()
        now = time.perf_counter()
        slot = self.state['phases'].setdefault(phase, {'steps': 0, 'seconds': 0.0})
        slot['steps'] += 1
        slot['seconds'] += now - self._last_end
        self._step_in_epoch += 1
        # a getrusage call: microseconds
        self._train_peak = self._note_peak(int(self.trainer.current_epoch) + 1, self._step_in_epoch)
        self._last_end = now
        return out

    def on_epoch_end(self):
        result = self._on_epoch_end()  # nnU-Net's: logs, checkpoint_latest
        self.state['train_wall_s'] += time.perf_counter() - self._epoch_start
        self.state['epochs_done'] = int(self.trainer.current_epoch)
        held = current_memory_mb(self.device)  # read before the peak, which can then only be >= it
        epoch_peak = self._note_peak(self.state['epochs_done'], 'epoch_end')  # nnU-Net has counted the epoch
        self.state['peak_memory_mb'] = max(self.state['peak_memory_mb'], epoch_peak)
        self.state['memory_by_epoch'].append({
            'epoch': self.state['epochs_done'], 'train_peak_mb': self._train_peak,
            'epoch_peak_mb': epoch_peak, 'rss_mb': held})
        if self._machine not in self.state['machines']:  # the machines that trained epochs, not the one predicting
            self.state['machines'].append(self._machine)
        self.save()
        done, total = self.state['epochs_done'], self.trainer.num_epochs
        now = time.time()
        if done in (1, total) or now - self._last_print > 60:
            per_epoch = self.state['train_wall_s'] / max(1, done)
            log(f'epoch {done}/{total}, {per_epoch:.1f} s/epoch, training ETA {_hms(per_epoch * (total - done))}')
            self._last_print = now
        return result

    def save(self):
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as fh:
            json.dump(self.state, fh, indent=1)
        os.replace(tmp, self.path)

    def seconds_per_iteration(self) -> dict:
        return {p: v['seconds'] / v['steps'] for p, v in self.state['phases'].items() if v['steps']}


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def peak_memory_mb(device) -> float:
    """CUDA: ``torch.cuda.max_memory_allocated``; CPU: this process' peak resident set size (augmentation workers,
    separate processes, not included). Rounded to 0.1 MB here, once, so that every record compares as it reads."""
    if device.type == 'cuda':
        import torch
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2 ** 20 if sys.platform == 'darwin' else rss / 1024, 1)  # bytes on macOS, KiB on Linux


def current_memory_mb(device) -> Optional[float]:
    """CUDA: ``torch.cuda.memory_allocated``; CPU: this process' resident set now (VmRSS; None where there is no
    /proc)."""
    if device.type == 'cuda':
        import torch
        return round(torch.cuda.memory_allocated(device) / 2 ** 20, 1)
    try:
        with open('/proc/self/status') as fh:
            for line in fh:
                if line.startswith('VmRSS:'):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def resume_point(fold_folder: str) -> Optional[str]:
    """What ``nnUNetv2_train --c`` would continue from: ``checkpoint_final.pth`` (training done),
    ``checkpoint_latest.pth``, or None (start)."""
    for name in ('checkpoint_final.pth', 'checkpoint_latest.pth'):
        if os.path.isfile(os.path.join(fold_folder, name)):
            return name
    return None


# ---------------------------------------------------------------------------------------------- the run
def build_trainer(spec: dict, plans: dict, device):
    """The run's trainer as ``nnUNetv2_train --c`` builds it, with the benchmark's schedule set."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_semiseg.discovery import find_trainer
    plans = dict(plans, continue_training=True)  # what nnUNetv2_train --c sets
    dataset_json = load_json(os.path.join(spec['preprocessed_folder'], 'dataset.json'))
    trainer = find_trainer(spec['trainer'])(plans, spec['configuration'], int(spec['fold']), dataset_json, device)
    trainer.num_epochs = int(spec['epochs'])
    trainer.num_iterations_per_epoch = int(spec['iterations_per_epoch'])
    trainer.num_val_iterations_per_epoch = int(spec['val_iterations_per_epoch'])
    trainer.save_every = 1  # checkpoint_latest after every epoch, so a killed run loses at most one epoch
    return trainer


# attributes that training changes (nnU-Net's debug.json records them as they were when the last session started)
RUN_STATE = frozenset({'current_epoch', 'semiseg_step', 'in_pretraining', 'was_initialized', 'num_unlabeled_cases',
                       'nonfinite_steps_skipped', 'local_rank', 'is_ddp'})


def setting_differences(recorded: dict, trainer) -> list:
    """The trainer's settings that a run's ``debug.json`` (nnU-Net's record of every trainer attribute, as text,
    written when a training session starts) holds with another value: ``[(name, then, now)]``, sorted by name.

    Settings are the freshly built trainer's own attributes that hold a bool, int, float, or str that is not a path;
    private attributes, training state (``RUN_STATE``) and attributes that are None until training starts are not
    compared (so a setting whose new default is None goes unnoticed)."""
    differences = []
    for name, value in sorted(vars(trainer).items()):
        if name.startswith('_') or name in RUN_STATE or name not in recorded:
            continue
        # None (not an instance of these) is what loaders, optimizer and input channels hold until training starts
        if not isinstance(value, (bool, int, float, str)) or (isinstance(value, str) and os.sep in value):
            continue
        if str(value) != recorded[name]:
            differences.append((name, recorded[name], str(value)))
    return differences


def check(path: str) -> dict:
    """``{debug_json: [(name, then, now), ...]}`` for the runs listed in ``path`` (written by the parent: the shared
    spec, with the plans, and each run's trainer and ``debug.json``): which settings changed since each ran."""
    import torch
    with open(path) as fh:
        job = json.load(fh)
    found = {}
    for item in job['runs']:
        trainer = build_trainer(dict(job['spec'], trainer=item['trainer']), job['plans'], torch.device('cpu'))
        with open(item['debug_json']) as fh:
            found[item['debug_json']] = setting_differences(json.load(fh), trainer)
    return found


def run(spec: dict) -> dict:
    t_start = time.time()
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from nnunet_semiseg.benchmark.runner import evaluation_folders, per_class_names
    from nnunet_semiseg.demo import predict_folder
    from nnunet_semiseg.evaluation import evaluate_folder

    trainer_name, seed, run_dir = spec['trainer'], int(spec['seed']), spec['run_dir']
    device = torch.device(spec['device'])
    if device.type == 'cpu':
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_train -device cpu
    else:
        torch.backends.cudnn.deterministic = False  # as nnUNetv2_train
        torch.backends.cudnn.benchmark = True
    seed_everything(seed)
    install_seeded_augmenters(seed)

    pre = spec['preprocessed_folder']
    trainer = build_trainer(spec, load_json(os.path.join(pre, spec['plans'] + '.json')), device)
    dataset_json = trainer.dataset_json

    timer = RunTimer(os.path.join(run_dir, 'timing.json'), trainer, device)
    start_point = resume_point(trainer.output_folder)
    if start_point == 'checkpoint_final.pth':
        log('training already finished (checkpoint_final.pth): predicting')
    else:
        if start_point is not None:
            trainer.load_checkpoint(os.path.join(trainer.output_folder, start_point))
            log(f'continuing from {start_point} at epoch {trainer.current_epoch}/{trainer.num_epochs}')
        t_setup = time.time()
        trainer.run_training()
        log(f'training done in {_hms(time.time() - t_setup)} (this session)')
    from nnunet_semiseg.training.base import nnUNetTrainerSemiSupervised
    semi_supervised = isinstance(trainer, nnUNetTrainerSemiSupervised)
    unlabeled_cases = None
    if semi_supervised:  # the stream's own count when it started here, else the raw folder's (counted by the parent)
        unlabeled_cases = int(trainer.num_unlabeled_cases) if trainer.dataloader_unlabeled is not None \
            else spec.get('unlabeled_cases')
    model_folder = trainer.output_folder_base
    timer.state['peak_memory_mb'] = max(timer.state['peak_memory_mb'], peak_memory_mb(device))
    timer.save()
    del trainer

    images, labels, n_cases = evaluation_folders(spec)
    pred_dir = os.path.join(run_dir, 'predictions')
    log(f'predicting {n_cases} {spec["evaluation"]["set"]} cases with checkpoint_final (no TTA)')
    predict_folder(model_folder, images, pred_dir, int(spec['fold']), spec['device'])
    summary = evaluate_folder(pred_dir, labels, os.path.join(run_dir, 'metrics.json'),
                              dataset_json_file=os.path.join(spec['raw_folder'], 'dataset.json'), num_processes=1)
    names = per_class_names(dataset_json)
    metrics = {'mean': {m: summary['foreground_mean'][m] for m in ('dice', 'jaccard', 'hd95', 'asd')},
               'per_class': {names[int(k)]: dict({m: v[m] for m in ('dice', 'jaccard', 'hd95', 'asd')},
                                                 label=int(k), n_cases=v['n_cases'])
                             for k, v in summary['mean'].items()}}
    record = {
        'trainer': trainer_name, 'seed': seed, 'epochs': int(spec['epochs']),
        'iterations_per_epoch': int(spec['iterations_per_epoch']),
        'iterations': int(spec['epochs']) * int(spec['iterations_per_epoch']),
        'semi_supervised': semi_supervised, 'unlabeled_cases': unlabeled_cases,
        'train_wall_s': timer.state['train_wall_s'], 's_per_iteration': timer.seconds_per_iteration(),
        'steps_per_phase': {p: v['steps'] for p, v in timer.state['phases'].items()},
        'peak_memory_mb': timer.state['peak_memory_mb'],
        'sessions': timer.state['segments'], 'device': spec['device'], 'machines': timer.state['machines'],
        'nnUNet_n_proc_DA': get_allowed_n_proc_DA(),
        'evaluation': {'set': spec['evaluation']['set'], 'n_cases': n_cases},
        'metrics': metrics,
        'model_folder': os.path.relpath(model_folder, os.path.dirname(run_dir)),
        'predictions': os.path.relpath(pred_dir, os.path.dirname(run_dir)),
        'last_session_wall_s': time.time() - t_start,
    }
    tmp = os.path.join(run_dir, 'run.json.tmp')
    with open(tmp, 'w') as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, os.path.join(run_dir, 'run.json'))
    log(f'mean Dice {metrics["mean"]["dice"]:.4f}')
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == '--check':
        print('RESULT ' + json.dumps(check(argv[1])), flush=True)
        return 0
    if len(argv) != 1:
        print('usage: python -m nnunet_semiseg.benchmark.child RUN_DIR/spec.json  (or --check JOB.json)',
              file=sys.stderr)
        return 2
    with open(argv[0]) as fh:
        run(json.load(fh))
    return 0


if __name__ == '__main__':
    sys.exit(main())
