"""Cost of a whole training run of our trainers against nnU-Net's plain ``nnUNetTrainer`` on the same plans and data:
seconds per iteration and peak memory.

Each trainer runs in its own subprocess (so peak memory is its own): it is built exactly as ``nnUNetv2_train``
builds it, its data loaders start, then each of its phases runs ``--warmup`` untimed and ``--iterations`` timed
training steps (seconds per step, median or ``--statistic min``: labelled + unlabelled batch, teacher, heads,
losses, backward, optimizer and EMA update; the unlabelled batch is fetched inside the step, the labelled one
before it, as nnU-Net's own loop does; validation is not run). The two-stage contrastive trainers are timed in both
phases, relational pre-training and fine-tuning, and their **whole run** is the mean weighted by each phase's share
of the iterations (``pretrain_fraction``); a single-phase trainer's whole run is its step. The time a step waits
for its unlabelled batch is measured too, and the step without that wait: on a machine whose cores also run the
augmentation workers (the 2-core CPU boxes) the wait is part of the cost; where the workers keep up, it is not. Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA, the process' peak resident set size on CPU (torch and nnU-Net's
imports alone are most of a gigabyte). On CPU the table also gives **peak tensor memory** (``tensor_memory.py``: the
tensors alive plus the highest point of a profiled extra step's allocations, the second of two, per phase, the
larger phase counted),
the figure that compares with the GPU's, where only tensors count.

``--rounds R`` repeats the whole list R times, reversing the order every other round, and reports each trainer's
median over the rounds and its multiple of plain nnU-Net **within each round** (median and range): on shared or
throttling cores plain's own step drifts by 10-20 % between runs, and a multiple taken inside one round cancels the
drift that a multiple of two separate runs keeps.

A trainer may carry attribute overrides, ``NAME:attr=value[,attr=value]`` (values as JSON), e.g.
``nnUNetTrainerMONA:lambda_equivariance=0``: they are set after the trainer is built, as a subclass would.

Without ``-d`` a phantom dataset is generated and planned in a temporary folder (2d and 3d_fullres, CPU-sized plans).

    python benchmarks/bench_trainers.py                         # phantom, 2d, CPU, all trainers
    python benchmarks/bench_trainers.py -c 3d_fullres
    python benchmarks/bench_trainers.py -d 27 -c 2d -p nnUNetPlans_cpu --iterations 3 --warmup 1 \\
        --trainers nnUNetTrainer nnUNetTrainerMONA nnUNetTrainerMONA:lambda_equivariance=0
    python benchmarks/bench_trainers.py -d 27 -c 2d -p nnUNetPlans_cpu --iterations 6 --warmup 2 --rounds 4 \\
        --no-tensor-memory --trainers nnUNetTrainer nnUNetTrainerARCO_SG nnUNetTrainerARCO_SAG
    python benchmarks/bench_trainers.py -d 27 -c 2d -p nnUNetPlans --device cuda   # your planned dataset
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

TRAINERS = ['nnUNetTrainer', 'nnUNetTrainerMeanTeacher', 'nnUNetTrainerMONA', 'nnUNetTrainerARCO_SG',
            'nnUNetTrainerARCO_SAG', 'nnUNetTrainerACTION', 'nnUNetTrainerACTIONpp']


def parse_trainer(spec: str):
    """``'NAME:a=1,b=x'`` -> ``('NAME', {'a': 1, 'b': 'x'})``."""
    name, _, rest = spec.partition(':')
    attributes = {}
    for item in filter(None, rest.split(',')):
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(f'trainer attribute {item!r} in {spec!r} is not attr=value')
        try:
            attributes[key] = json.loads(value)
        except json.JSONDecodeError:
            attributes[key] = value
    return name, attributes


def add_dataset_arguments(parser) -> None:
    """``-d`` / ``-c`` / ``-p``: the planned dataset, configuration and plans :func:`build_trainer` reads, for the
    scripts in ``benchmarks/`` that build one trainer."""
    parser.add_argument('-d', required=True, help='dataset ID or name, planned and preprocessed')
    parser.add_argument('-c', default='2d')
    parser.add_argument('-p', default='nnUNetPlans')


def build_trainer(spec: str, dataset, configuration: str, plans_name: str, device, epochs: int = 1000,
                  iterations: int = 250):
    """The trainer ``spec`` (``NAME[:attr=value,...]``) built as ``nnUNetv2_train`` builds it on a planned dataset
    (ID or name), fold 0, attribute overrides set, the schedule ``epochs x iterations`` (phase lengths follow it),
    no checkpoints. Shared by the scripts in ``benchmarks/``. Returns ``(name, trainer)``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_semiseg.discovery import find_trainer

    name, attributes = parse_trainer(spec)
    pre = os.path.join(str(nnUNet_preprocessed), maybe_convert_to_dataset_name(dataset))
    plans = load_json(os.path.join(pre, plans_name + '.json'))
    plans['continue_training'] = False
    trainer = find_trainer(name)(plans, configuration, 0, load_json(os.path.join(pre, 'dataset.json')), device)
    for key, value in attributes.items():
        if not hasattr(trainer, key):
            raise AttributeError(f'{name} has no attribute {key!r}')
        setattr(trainer, key, value)
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.disable_checkpointing = True
    return name, trainer


class TimedLoader:
    """Wraps a data loader and records how long each ``next()`` waited (seconds), so a step's time splits into
    waiting for the unlabelled batch and the rest; every other attribute is the loader's."""

    def __init__(self, loader):
        self.loader = loader
        self.waits = []

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.loader)
        self.waits.append(time.perf_counter() - t0)
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def measure(args) -> dict:
    import numpy as np
    import torch

    from nnunet_semiseg.training.base import stop_loaders

    torch.manual_seed(0)
    device = torch.device(args.device)
    name, trainer = build_trainer(args.single, args.dataset, args.configuration, args.plans, device)
    trainer.on_train_start()
    two_stage = hasattr(trainer, 'pretrain_iterations')
    phases = [p for p in ('pretrain', 'finetune') if args.phase in ('both', p)] if two_stage else ['-']
    trainer.on_train_epoch_start()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    unlabeled = getattr(trainer, 'dataloader_unlabeled', None)
    if unlabeled is not None:
        trainer.dataloader_unlabeled = unlabeled = TimedLoader(unlabeled)
    seconds, all_times, waits = {}, {}, {}
    tensor_peak_mb = 0.0
    for phase in phases:
        if phase == 'pretrain':
            trainer.semiseg_step = 0
        elif phase == 'finetune':
            trainer.semiseg_step = trainer.pretrain_iterations  # jump to the fine-tuning phase
        times, step_waits = [], []
        for i in range(args.warmup + args.iterations):
            batch = next(trainer.dataloader_train)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            n_waits = len(unlabeled.waits) if unlabeled is not None else 0
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                step_waits.append(sum(unlabeled.waits[n_waits:]) if unlabeled is not None else 0.0)
        all_times[phase] = times
        if device.type == 'cpu' and args.tensor_memory:   # two more, profiled steps: not among the timed ones
            from tensor_memory import peak_tensor_bytes
            batch = next(trainer.dataloader_train)
            tensor_peak_mb = max(tensor_peak_mb,
                                 peak_tensor_bytes(lambda: trainer.train_step(batch), repeat=True) / 2 ** 20)
        stat = np.median if args.statistic == 'median' else np.min
        seconds[phase] = float(stat(times))
        # the unlabelled-batch wait of the typical step, and the step without it (same statistic, taken per step)
        waits[phase] = {'wait_s': float(np.median(step_waits)),
                        'without_wait_s': float(stat(np.subtract(times, step_waits)))}
    if device.type == 'cuda':
        peak_mb = tensor_peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    share = trainer.pretrain_iterations / trainer.total_iterations if two_stage else 0.0
    def weighted(values):
        if two_stage and len(phases) == 2:
            return share * values['pretrain'] + (1 - share) * values['finetune']
        return values[phases[0]]
    whole = weighted(seconds)
    whole_wait = weighted({k: v['wait_s'] for k, v in waits.items()})
    whole_without_wait = weighted({k: v['without_wait_s'] for k, v in waits.items()})
    stop_loaders(trainer)
    return {'trainer': args.single, 'seconds': seconds, 'times': all_times, 'pretrain_share': share, 'whole_s': whole,
            'waits': waits, 'whole_wait_s': whole_wait, 'whole_without_wait_s': whole_without_wait,
            'peak_mb': peak_mb, 'tensor_peak_mb': tensor_peak_mb or None, 'batch': trainer.batch_size, 'patch': list(trainer.configuration_manager.patch_size)}


def combine_rounds(rounds: list) -> list:
    """Rows of several rounds (each a list of ``measure`` results, plain nnU-Net among them) -> one row per trainer:
    the median over rounds of each phase's seconds and of the whole-run figures, the largest peak memory, and
    ``round_multiples``, the trainer's whole-run seconds over plain's *in the same round*, one per round."""
    import numpy as np

    base = 'nnUNetTrainer'
    by_trainer = {}
    for rows in rounds:
        plain = next((r for r in rows if r['trainer'] == base), None)
        for r in rows:
            entry = by_trainer.setdefault(r['trainer'], {'rows': [], 'multiples': []})
            entry['rows'].append(r)
            if plain is not None:
                entry['multiples'].append(r['whole_s'] / plain['whole_s'])
    combined = []
    for trainer, entry in by_trainer.items():
        rows = entry['rows']
        row = dict(rows[0])
        row['seconds'] = {k: float(np.median([r['seconds'][k] for r in rows])) for k in rows[0]['seconds']}
        for key in ('whole_s', 'whole_wait_s', 'whole_without_wait_s'):
            row[key] = float(np.median([r[key] for r in rows]))
        for key in ('peak_mb', 'tensor_peak_mb'):
            values = [r[key] for r in rows if r.get(key)]
            row[key] = max(values) if values else None
        row['round_multiples'] = entry['multiples']
        combined.append(row)
    return combined


def make_phantom(root: str) -> None:
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = os.path.join(root, var)
        os.makedirs(os.environ[var], exist_ok=True)
    from nnunet_semiseg.demo import make_phantom_dataset, plan_and_preprocess, write_cpu_plans
    make_phantom_dataset(os.environ['nnUNet_raw'], 995, 'BenchPhantom', n_labeled=6, n_val=0, n_unlabeled=8, n_test=0,
                         shape=(16, 96, 96))
    plan_and_preprocess(995, ['2d', '3d_fullres'], num_processes=2, progress=False)
    write_cpu_plans(os.path.join(os.environ['nnUNet_preprocessed'], 'Dataset995_BenchPhantom'),
                    features=(16, 32, 64, 128), batch_size_2d=8, batch_size_3d=2)


def table(rows, args) -> str:
    base = next((r for r in rows if r['trainer'] == 'nnUNetTrainer'), rows[0])
    # CPU runs: RSS and, beside it, the tensors alone (on CUDA the two are the same figure)
    tensors = args.device == 'cpu' and all(r.get('tensor_peak_mb') for r in rows)
    rounds = all(r.get('round_multiples') for r in rows)   # --rounds: the within-round multiples
    lines = [f'dataset {args.dataset}, {args.configuration}, plans {args.plans}, device {args.device}, '
             f'batch {base["batch"]} labelled (+ the same unlabelled), patch {base["patch"]}, '
             f'{args.iterations} timed iterations per phase after {args.warmup} warm-up, {args.statistic}',
             '| trainer | pre-training s/it | fine-tuning s/it | whole run s/it | x nnUNetTrainer | peak memory (MB) '
             '| x nnUNetTrainer | unlabelled-data wait s/it | without it: s/it | x nnUNetTrainer |'
             + (' peak tensors (MB) | x nnUNetTrainer |' if tensors else '')
             + (' x nnUNetTrainer within each round: median (min-max) |' if rounds else ''),
             '|---|---|---|---|---|---|---|---|---|---|' + ('---|---|' if tensors else '') + ('---|' if rounds else '')]
    for r in rows:
        pre, fine = r['seconds'].get('pretrain'), r['seconds'].get('finetune')
        cells = [f'{pre:.3f}' if pre is not None else '-', f'{fine:.3f}' if fine is not None else '-']
        # the phases' weights in the whole run
        share = '' if pre is None or fine is None else f' ({r["pretrain_share"]:.2f} / {1 - r["pretrain_share"]:.2f})'
        lines.append(f'| {r["trainer"]} | {cells[0]} | {cells[1]} | {r["whole_s"]:.3f}{share} | '
                     f'{r["whole_s"] / base["whole_s"]:.2f} | {r["peak_mb"]:.0f} | '
                     f'{r["peak_mb"] / base["peak_mb"]:.2f} | {r["whole_wait_s"]:.3f} | '
                     f'{r["whole_without_wait_s"]:.3f} | {r["whole_without_wait_s"] / base["whole_without_wait_s"]:.2f} |'
                     + (f' {r["tensor_peak_mb"]:.0f} | {r["tensor_peak_mb"] / base["tensor_peak_mb"]:.2f} |'
                        if tensors else '')
                     + (f' {_median(r["round_multiples"]):.2f} ({min(r["round_multiples"]):.2f}-'
                        f'{max(r["round_multiples"]):.2f}) |' if rounds else ''))
    lines.append('Wait: the median time a step spent in next() on the unlabelled loader (plain nnU-Net has none; its '
                 'labelled batch is fetched outside the timed step for every trainer). "Without it": the statistic '
                 'of (step - its wait), i.e. compute when the augmentation workers keep up.'
                 + (' Peak memory: resident set size; peak tensors: tensors alone (tensor_memory.py), what a GPU '
                    'counts.' if tensors else '')
                 + (f' {len(rows[0]["round_multiples"])} rounds, the order reversed every other round: seconds are '
                    'medians over the rounds, the last column each round\'s own multiple.' if rounds else ''))
    return '\n'.join(lines)


def _median(values):
    import numpy as np
    return float(np.median(values))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', '--dataset', default=None, help='planned dataset (default: a generated phantom)')
    p.add_argument('-c', '--configuration', default='2d')
    p.add_argument('-p', '--plans', default=None, help='default: nnUNetPlans, or the CPU-sized plans of the phantom')
    p.add_argument('--trainers', nargs='+', default=TRAINERS, help='NAME or NAME:attr=value[,attr=value]')
    p.add_argument('--iterations', type=int, default=10, help='timed steps per phase')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps before each phase')
    p.add_argument('--phase', choices=['both', 'finetune', 'pretrain'], default='both',
                   help='phases of the two-stage trainers to time (whole run: both)')
    p.add_argument('--statistic', choices=['median', 'min'], default='median',
                   help='of the timed steps of a phase; min (best of N) discounts steps slowed by other processes')
    p.add_argument('--rounds', type=int, default=1,
                   help='repeat the list this many times, the order reversed every other round; multiples of plain '
                        'are then taken within each round (needs nnUNetTrainer in --trainers)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--no-tensor-memory', dest='tensor_memory', action='store_false',
                   help='on CPU, skip the profiled step that measures peak tensor memory')
    p.add_argument('--json', default=None, help='also write the measurements to this file')
    p.add_argument('--single', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.single:
        print('RESULT ' + json.dumps(measure(args)), flush=True)
        return
    env = dict(os.environ)
    env.setdefault('nnUNet_def_n_proc', '2')
    if args.dataset is None:
        root = tempfile.mkdtemp(prefix='nnunet_semiseg_bench_')
        os.environ.update({k: v for k, v in env.items() if k == 'nnUNet_def_n_proc'})
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's planning chatter; the table goes to stdout
            make_phantom(root)
        env.update({k: os.environ[k] for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')})
        args.dataset, args.plans = '995', args.plans or 'nnUNetPlans_demo'
    args.plans = args.plans or 'nnUNetPlans'
    env.setdefault('nnUNet_n_proc_DA', '2' if args.device == 'cpu' else '8')
    for trainer in args.trainers:
        parse_trainer(trainer)  # fail early on a malformed spec
    if args.rounds > 1 and 'nnUNetTrainer' not in args.trainers:
        sys.exit('--rounds takes multiples within each round: add nnUNetTrainer to --trainers')
    rounds = []
    for round_index in range(args.rounds):
        order = args.trainers if round_index % 2 == 0 else args.trainers[::-1]
        rounds.append(run_round(order, args, env, rounds))
    rows = rounds[0] if args.rounds == 1 else combine_rounds(rounds)
    if not rows:
        sys.exit(1)
    if args.json and args.rounds > 1:   # 'rows' as in a single round: one per trainer, here the medians
        with open(args.json, 'w') as fh:
            json.dump({'args': vars(args), 'rows': rows, 'rounds': rounds}, fh, indent=1)
    print()
    print(table(rows, args))


def run_round(trainers, args, env, done) -> list:
    """Measures each trainer in its own subprocess; ``done`` holds the earlier rounds (for ``--json``)."""
    rows = []
    for trainer in trainers:
        cmd = [sys.executable, os.path.abspath(__file__), '--single', trainer, '-d', args.dataset, '-c',
               args.configuration, '-p', args.plans, '--iterations', str(args.iterations), '--warmup',
               str(args.warmup), '--phase', args.phase, '--device', args.device, '--statistic', args.statistic]
        if not args.tensor_memory:
            cmd.append('--no-tensor-memory')
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        if out.returncode != 0 or not line:
            print(f'{trainer} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
            continue
        rows.append(json.loads(line[0][len('RESULT '):]))
        print(f'  round {len(done) + 1}: measured {trainer}: {rows[-1]["seconds"]} s/it, peak '
              f'{rows[-1]["peak_mb"]:.0f} MB', file=sys.stderr, flush=True)
        if args.json:  # after every trainer, so an interrupted run keeps what it measured
            with open(args.json, 'w') as fh:
                json.dump({'args': vars(args), 'rows': rows, 'rounds': done + [rows]}, fh, indent=1)
    return rows


if __name__ == '__main__':
    main()
