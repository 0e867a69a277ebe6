"""Where a training step's peak of tensor memory sits: the running sum of the step's allocations (CPU profiler,
``tensor_memory.py``) at the start and end of its parts (teacher forward, student forward, each loss term, backward,
second pass, optimizer, EMA update), and the highest point inside each. The second of two steps is measured, so the
first step's leftovers are freed inside it as in a long run.

    python benchmarks/memory_parts.py -d 27 -p nnUNetPlans_cpu -tr nnUNetTrainerARCO_SAG --phase finetune

Levels are MB above what was alive when the step began (which is printed first); a part's levels include whatever
earlier parts left alive. On CPU only (the profiler's allocation events); a GPU's own figure is
``torch.cuda.max_memory_allocated`` (``bench_trainers.py --device cuda``).
"""
import argparse
import bisect
import functools
import multiprocessing
import os
import sys

import torch
from torch.profiler import record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainers import add_dataset_arguments, build_trainer  # noqa: E402
from tensor_memory import allocations, profile_call  # noqa: E402

PART = 'part: '
TRAINER_PARTS = ('_buffer_snapshot', 'prepare_student_input', 'teacher_forward', 'compute_semisupervised_terms',
                 '_labels_probs_conf', '_student_representation', '_teacher_representation',
                 '_release_teacher_outputs', '_backward', 'second_pass_terms', '_optimizer_step')
LOSS_MODULES = ('pixel_contrast', 'nearest_neighbour', 'anatomical_contrast', 'supervised_contrast')


def _label(obj, attr: str, label: str) -> None:
    """Wrap ``obj.attr`` so that each call is a profiler range named ``label``."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        with record_function(PART + label):
            return fn(*args, **kwargs)
    setattr(obj, attr, labelled)


def label_parts(trainer) -> None:
    for attr in TRAINER_PARTS:
        if hasattr(trainer, attr):
            _label(trainer, attr, attr)
    _label(trainer, 'loss', 'supervised loss')
    _label(trainer.network, 'forward', 'student forward')
    if getattr(trainer, 'teacher', None) is not None:
        _label(trainer.teacher, 'update', 'teacher.update')
    for key in LOSS_MODULES:
        if key in getattr(trainer, 'semiseg_modules', {}):
            _label(trainer.semiseg_modules[key], 'forward', key)


def part_levels(events, begin: int, end: int):
    """From kineto events: (peak time, peak bytes, [(part, start level, end level, max level, holds the peak)]) of
    the allocations between ``begin`` and ``end`` (ns), levels relative to ``begin``."""
    mem = allocations(events, begin, end)
    times, levels, level, peak = [t for t, _ in mem], [], 0, (begin, 0)
    for t, nbytes in mem:
        level += nbytes
        levels.append(level)
        if level > peak[1]:
            peak = (t, level)

    def at(t):
        i = bisect.bisect_right(times, t) - 1
        return levels[i] if i >= 0 else 0

    def highest(a, b):
        i, j = bisect.bisect_left(times, a), bisect.bisect_right(times, b)
        return max(levels[i:j]) if j > i else at(a)
    parts = sorted((e.start_ns(), e.end_ns(), e.name()[len(PART):]) for e in events
                   if e.name().startswith(PART) and begin <= e.start_ns() <= end)
    return peak, [(name, at(s), at(e), highest(s, e), s <= peak[0] <= e) for s, e, name in parts]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(p)
    p.add_argument('-tr', required=True, help='NAME or NAME:attr=value[,attr=value]')
    p.add_argument('--phase', choices=['pretrain', 'finetune'], default='finetune',
                   help='phase of a two-stage trainer')
    args = p.parse_args()

    torch.manual_seed(0)
    _, trainer = build_trainer(args.tr, args.d, args.c, args.p, torch.device('cpu'))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    if hasattr(trainer, 'pretrain_iterations'):
        trainer.semiseg_step = trainer.pretrain_iterations if args.phase == 'finetune' else 0
    label_parts(trainer)
    batch = next(trainer.dataloader_train)
    live, events, begin, end = profile_call(lambda: trainer.train_step(batch), repeat=True)
    (_, peak), parts = part_levels(events, begin, end)
    mb = 2 ** 20
    print(f'{args.tr}, {args.phase}: {live / mb:.0f} MB alive when the step began, peak {peak / mb:.0f} MB above '
          f'it, {(live + peak) / mb:.0f} MB in all')
    print('| part | start (MB) | end (MB) | highest (MB) |\n|---|---|---|---|')
    for name, start, end, top, has_peak in parts:
        print(f'| {name}{" (peak)" if has_peak else ""} | {start / mb:.0f} | {end / mb:.0f} | {top / mb:.0f} |')
    sys.stdout.flush()
    for child in multiprocessing.active_children():   # nnU-Net's augmentation workers
        child.terminate()
    os._exit(0)


if __name__ == '__main__':
    main()
