"""Per-case Dice of the runs in a ``nnunet-semiseg benchmark`` output folder, paired to plain nnU-Net by seed.

A class mean over 20 validation frames hides where a trainer wins or loses: on real ACDC with 3 labelled patients
a handful of frames that every model nearly misses (end-systolic frames with a small left ventricle, a patient of
the RV group) move the mean more than all the others together. This script shows that, per case and class::

    python benchmarks/per_case.py /work/runs/bench_acdc                  # every run, cases sorted by plain Dice
    python benchmarks/per_case.py OUT --seed 0 --trainers nnUNetTrainerMeanTeacher
    python benchmarks/per_case.py OUT --margin 0.05                      # win/loss threshold of the summary

It reads ``OUT/benchmark.json`` and each run's ``metrics.json``; it computes nothing the benchmark did not store.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from nnunet_semiseg.benchmark.report import BASELINE, short_name


def case_dice(metrics_file: str) -> Dict[str, Dict[str, float]]:
    """``{case: {label: dice}}`` from a benchmark run's ``metrics.json`` (foreground labels only)."""
    with open(metrics_file) as fh:
        metrics = json.load(fh)
    out = {}
    for entry in metrics['metric_per_case']:
        case = os.path.basename(entry['reference_file']).split('.')[0]
        out[case] = {label: float(m['dice']) for label, m in entry['metrics'].items() if label != '0'}
    return out


def load_runs(out: str, trainers: Optional[List[str]] = None, seed: Optional[int] = None):
    """``[(trainer, seed, {case: {label: dice}})]`` of the finished runs in ``out``, plain nnU-Net first."""
    with open(os.path.join(out, 'benchmark.json')) as fh:
        bench = json.load(fh)
    runs = []
    for run in bench['runs']:
        if seed is not None and run['seed'] != seed:
            continue
        if trainers and run['trainer'] not in trainers and run['trainer'] != BASELINE:
            continue
        metrics_file = os.path.join(out, os.path.dirname(run['predictions']), 'metrics.json')
        if not os.path.isfile(metrics_file):
            continue
        runs.append((run['trainer'], int(run['seed']), case_dice(metrics_file)))
    runs.sort(key=lambda r: (r[0] != BASELINE, r[0], r[1]))
    return runs


def mean_dice(per_label: Dict[str, float]) -> float:
    return sum(per_label.values()) / len(per_label)


def report(runs, margin: float = 0.05) -> str:
    if not runs:
        return 'no finished runs'
    plain = {s: d for t, s, d in runs if t == BASELINE}
    ref = plain[min(plain)] if plain else runs[0][2]
    cases = sorted(ref, key=lambda c: mean_dice(ref[c]))
    labels = sorted(next(iter(ref.values())), key=int)
    names = [f'{short_name(t)} s{s}' for t, s, _ in runs]
    lines = ['Mean foreground Dice per case (cases sorted by plain nnU-Net, lowest first); in brackets Dice of '
             f'labels {"/".join(labels)}.', '',
             '| case | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(runs)]
    for c in cases:
        cells = [f'{mean_dice(d[c]):.2f} ({"/".join(f"{d[c][k]:.2f}" for k in labels)})' if c in d else '-'
                 for _, _, d in runs]
        lines.append(f'| {c} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'Paired to plain nnU-Net of the same seed (a case counts as won/lost beyond +-{margin}):', '',
              '| run | mean Δ | won | lost | Δ from the 5 lowest plain cases | Δ from the others |',
              '|---|---|---|---|---|---|']
    for (t, s, d), name in zip(runs, names):
        if t == BASELINE or s not in plain:
            continue
        base = plain[s]
        order = sorted(base, key=lambda c: mean_dice(base[c]))
        delta = {c: mean_dice(d[c]) - mean_dice(base[c]) for c in base if c in d}
        n = len(delta)
        low = sum(delta[c] for c in order[:5] if c in delta) / n
        lines.append(f'| {name} | {sum(delta.values()) / n:+.3f} | {sum(v > margin for v in delta.values())} | '
                     f'{sum(v < -margin for v in delta.values())} | {low:+.3f} | '
                     f'{sum(delta.values()) / n - low:+.3f} |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', help='output folder of nnunet-semiseg benchmark (holds benchmark.json)')
    p.add_argument('--trainers', nargs='+', help='only these trainers (plain nnU-Net is always shown)')
    p.add_argument('--seed', type=int, help='only this seed')
    p.add_argument('--margin', type=float, default=0.05, help='Dice difference that counts as a win or a loss')
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.out, 'benchmark.json')):
        sys.exit(f'{args.out} has no benchmark.json: pass the -o folder of a finished nnunet-semiseg benchmark run')
    print(report(load_runs(args.out, args.trainers, args.seed), args.margin))


if __name__ == '__main__':
    main()
