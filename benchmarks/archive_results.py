"""Keep the records of a ``nnunet-semiseg benchmark`` folder without its models and predictions.

A benchmark folder holds about 80 MB per run (two checkpoints, predictions); what its tables are made from is a few
tens of kB: ``benchmark.json`` / ``benchmark.md``, and per finished run ``run.json``, ``timing.json``,
``metrics.json`` (per-case Dice, HD95, ...) and nnU-Net's training log (losses and validation pseudo Dice per
epoch), plus nnU-Net's ``debug.json`` (every trainer setting the run had), kept at its place in the model folder so
that a benchmark run into a copy of the archive refuses to pair new runs with archived ones whose trainer's defaults
have changed since. This copies those, in the same layout, so that ``benchmarks/per_case.py`` and the figures in ``docs/`` can be
checked after the machine that trained the models is gone::

    python benchmarks/archive_results.py /work/runs/bench_acdc_500 benchmarks/results/acdc_dev_4x500

Unfinished runs (no ``run.json``) are skipped. Files already in ``DEST`` are replaced only by the same run's newer
records; nothing else in ``DEST`` is touched, so several sessions' runs of one benchmark collect in one folder.
``DEST/benchmark.json`` keeps the union of the finished runs of both folders, with its ``summary`` (spreads over
seeds, paired differences, cost multiples) and ``settings.trainers`` / ``settings.seeds`` computed over that union,
as the benchmark command computes them over its own runs.
"""
import argparse
import glob
import json
import os
import shutil
import sys
from typing import List

from nnunet_semiseg.benchmark.report import BASELINE, aggregate

RUN_FILES = ('run.json', 'timing.json', 'metrics.json')


def _load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def archive(out: str, dest: str) -> List[str]:
    """Copy the records of ``out``'s finished runs into ``dest``; returns the run folders copied."""
    bench_file = os.path.join(out, 'benchmark.json')
    if not os.path.isfile(bench_file):
        raise SystemExit(f'{out} has no benchmark.json: give the -o folder of a `nnunet-semiseg benchmark` run')
    bench = _load(bench_file)
    table_name = f'benchmark_{_stamp(bench)}.md'
    copied = []
    for run in bench.get('runs', []):
        run_dir = os.path.dirname(run['predictions'])  # <trainer>__seed<S>, relative to out
        src = os.path.join(out, run_dir)
        if not os.path.isfile(os.path.join(src, 'run.json')):
            continue
        dst = os.path.join(dest, run_dir)
        os.makedirs(dst, exist_ok=True)
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        logs = sorted(glob.glob(os.path.join(src, '*', '*', 'fold_*', 'training_log_*.txt')))
        for log in logs:  # one per training session (a continued run has several)
            shutil.copy2(log, os.path.join(dst, os.path.basename(log)))
        for debug in glob.glob(os.path.join(src, '*', '*', 'fold_*', 'debug.json')):
            # where the benchmark's check of changed defaults looks for it (runner.check_runs_unchanged)
            kept = os.path.join(dst, os.path.relpath(debug, src))
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            shutil.copy2(debug, kept)
        copied.append(run_dir)
    dest_file = os.path.join(dest, 'benchmark.json')
    runs = bench.get('runs', [])
    if os.path.isfile(dest_file):  # merge: runs of earlier archives that this folder no longer holds stay listed
        kept = {(r['trainer'], r['seed']): r for r in _load(dest_file).get('runs', [])}
        kept.update({(r['trainer'], r['seed']): r for r in runs})
        runs = list(kept.values())
    bench = _with_summary(bench.get('settings', {}), runs)
    os.makedirs(dest, exist_ok=True)
    with open(dest_file, 'w') as fh:
        json.dump(bench, fh, indent=1)
    if os.path.isfile(os.path.join(out, 'benchmark.md')):
        shutil.copy2(os.path.join(out, 'benchmark.md'), os.path.join(dest, table_name))
    return copied


def _with_summary(settings: dict, runs: List[dict]) -> dict:
    """benchmark.json's content for ``runs`` (finished runs' records): the trainers and seeds those runs cover, not
    those the command was asked for (a run still unfinished when the folder was archived is not in the archive),
    and the summary recomputed over them."""
    baseline = settings.get('baseline', BASELINE)
    runs = sorted(runs, key=lambda r: (r['trainer'] != baseline, r['trainer'], r['seed']))
    settings = dict(settings, trainers=list(dict.fromkeys([baseline] + [r['trainer'] for r in runs])),
                    seeds=sorted({int(r['seed']) for r in runs}))
    data = {'settings': settings, 'runs': runs}
    if runs:
        data['summary'] = aggregate(runs, baseline)
    return data


def _stamp(bench: dict) -> str:
    """A name for a folder's table (``bench``: its benchmark.json): the seeds it covers, so archives of later
    sessions do not overwrite it."""
    seeds = sorted({int(r['seed']) for r in bench.get('runs', [])})
    return 'seeds' + '-'.join(str(s) for s in seeds) if seeds else 'empty'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', help='the benchmark output folder (-o of nnunet-semiseg benchmark)')
    parser.add_argument('dest', help='where to keep the records (created if missing)')
    args = parser.parse_args(argv)
    copied = archive(args.out, args.dest)
    print(f'archived {len(copied)} finished run(s) into {args.dest}: ' + ', '.join(copied))


if __name__ == '__main__':
    sys.exit(main())
