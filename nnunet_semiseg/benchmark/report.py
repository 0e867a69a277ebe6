"""The benchmark's numbers from its run records: aggregation over seeds, paired differences to plain nnU-Net, the
markdown table and the figure. Pure functions of the records (no training, no nnU-Net imports), so they are tested
on hand-built records.

A run record (``OUT/<trainer>__seed<S>/run.json``, one entry of ``benchmark.json``'s ``runs``) holds at least::

    {"trainer": "nnUNetTrainerMONA", "seed": 0,
     "metrics": {"mean": {"dice": .., "jaccard": .., "hd95": .., "asd": ..},
                 "per_class": {"RV": {"label": 1, "dice": .., ...}, ...}},
     "train_wall_s": .., "s_per_iteration": {"pretrain": .., "finetune": ..}, "peak_memory_mb": ..,
     "semi_supervised": true, "unlabeled_cases": 134}

and, from 2026-12-06 on, ``"machines"``: the fingerprints (CPU model and flags, torch's CPU kernel level, threads,
GPU) of the machines that trained it. A seed's numbers are reproducible on one kind of machine and part ways on
another (floating-point paths differ), so a pair whose two runs trained on different machines is flagged.
"""
import json
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BASELINE = 'nnUNetTrainer'
# No-teach controls (nnunet_semiseg.training.controls): plain nnU-Net with jittered initial weights
CONTROL_PREFIX = 'nnUNetTrainer_jitter'
# Pairs before the controls' spread is used as a yardstick: on real ACDC one pair moved 0.1 Dice and another 4.4
MIN_CONTROL_PAIRS = 3
METRICS = ('dice', 'jaccard', 'hd95', 'asd')
METRIC_TITLES = {'dice': 'Dice', 'jaccard': 'Jaccard', 'hd95': 'HD95 (mm)', 'asd': 'ASD (mm)'}


def spread(values: Sequence[float]) -> dict:
    """``{"mean", "sd", "n", "values"}`` of the finite values: NaN-mean, sample SD (ddof 1; NaN below two values)."""
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float('nan')
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else float('nan')
    return {'mean': mean, 'sd': sd, 'n': len(finite), 'values': values}


def _trainer_order(records: List[dict], baseline: str) -> List[str]:
    names = list(dict.fromkeys(r['trainer'] for r in records))
    return ([baseline] if baseline in names else []) + [n for n in names if n != baseline]


def _classes(records: List[dict]) -> List[str]:
    return list(dict.fromkeys(c for r in records for c in r['metrics']['per_class']))


def machines_differ(a: dict, b: dict) -> bool:
    """Whether two run records trained on different machines; False where either predates the ``machines`` field
    (unknown, not flagged)."""
    ma, mb = a.get('machines'), b.get('machines')
    if not ma or not mb:
        return False
    key = lambda ms: sorted(json.dumps(m, sort_keys=True) for m in ms)
    return key(ma) != key(mb)


def is_control(trainer: str) -> bool:
    return trainer.startswith(CONTROL_PREFIX)


def no_teach_spread(trainers: Dict[str, dict]) -> Optional[dict]:
    """How far the no-teach controls moved from plain: their paired Dice differences (control, seed, Δ) and the
    root mean square of those, ``rms``. A control teaches nothing, so its differences scatter about zero and the
    RMS (not the SD about their own mean) is the spread of a single pair; ``None`` without a paired control."""
    pairs = [(t, s, d) for t, e in trainers.items() if is_control(t) and e['paired']
             for s, d in e['paired']['mean']['dice']['per_seed'].items() if math.isfinite(d)]
    if not pairs:
        return None
    return {'pairs': pairs, 'n': len(pairs), 'rms': float(np.sqrt(np.mean([d ** 2 for _, _, d in pairs])))}


def seeds_to_resolve(rms: float, difference: float) -> int:
    """Seeds (paired runs) after which a mean Δ Dice of ``difference`` lies 2 no-teach standard errors from zero:
    the smallest n with ``|difference| >= 2 rms / sqrt(n)``, i.e. ``ceil((2 rms / difference)^2)``, at least 1."""
    if difference == 0:
        raise ValueError('a difference of 0 is never resolved')
    return max(1, math.ceil((2 * rms / abs(difference)) ** 2 - 1e-9))


def aggregate(records: List[dict], baseline: str = BASELINE) -> dict:
    """Per trainer: the spread over seeds of every metric (class mean and per class), the paired difference to
    ``baseline`` seed by seed (trainer minus baseline, over the seeds both have), and the cost (training time,
    seconds per iteration per phase, peak memory) with time and memory as multiples of the baseline's on the
    same seeds (ratio of the means)."""
    classes = _classes(records)
    by_trainer: Dict[str, Dict[int, dict]] = {}
    for r in records:
        by_trainer.setdefault(r['trainer'], {})[int(r['seed'])] = r
    base = by_trainer.get(baseline, {})
    result = {'baseline': baseline, 'classes': classes, 'trainers': {}}
    for name in _trainer_order(records, baseline):
        runs = by_trainer[name]
        seeds = sorted(runs)
        entry = {'seeds': seeds,
                 'mean': {m: spread([runs[s]['metrics']['mean'][m] for s in seeds]) for m in METRICS},
                 'per_class': {c: {m: spread([runs[s]['metrics']['per_class'].get(c, {}).get(m, float('nan'))
                                              for s in seeds]) for m in METRICS} for c in classes},
                 'no_unlabeled_data': any(runs[s].get('semi_supervised') and not runs[s].get('unlabeled_cases')
                                          for s in seeds)}
        phases = list(dict.fromkeys(p for s in seeds for p in runs[s].get('s_per_iteration', {})))
        cost = {'train_wall_s': spread([runs[s]['train_wall_s'] for s in seeds]),
                'peak_memory_mb': spread([runs[s]['peak_memory_mb'] for s in seeds]),
                's_per_iteration': {p: spread([runs[s]['s_per_iteration'].get(p, float('nan')) for s in seeds])
                                    for p in phases}}
        paired_seeds = [s for s in seeds if s in base]
        paired = None
        if name != baseline and paired_seeds:
            def diffs(get):
                per_seed = {s: get(runs[s]) - get(base[s]) for s in paired_seeds}
                return dict(spread(list(per_seed.values())), per_seed=per_seed)
            paired = {'seeds': paired_seeds,
                      'other_machine': [s for s in paired_seeds if machines_differ(runs[s], base[s])],
                      'mean': {m: diffs(lambda r, m=m: r['metrics']['mean'][m]) for m in METRICS},
                      'per_class': {c: {m: diffs(lambda r, c=c, m=m: r['metrics']['per_class'].get(c, {}).get(
                          m, float('nan'))) for m in METRICS} for c in classes}}
            for key, field in (('time_x', 'train_wall_s'), ('memory_x', 'peak_memory_mb')):
                num = float(np.mean([runs[s][field] for s in paired_seeds]))
                den = float(np.mean([base[s][field] for s in paired_seeds]))
                cost[key] = num / den if den > 0 else float('nan')
        elif name == baseline:
            cost['time_x'] = cost['memory_x'] = 1.0
        entry['paired'] = paired
        entry['cost'] = cost
        result['trainers'][name] = entry
    # Each trainer's mean paired Δ Dice in standard errors of the no-teach spread over its seeds: rms / sqrt(n)
    result['no_teach'] = floor = no_teach_spread(result['trainers'])
    draws = plain_draws(by_trainer, baseline) if floor else {}
    for name, entry in result['trainers'].items():
        dice = entry['paired'] and entry['paired']['mean']['dice']
        if not dice or is_control(name):
            continue
        if floor and floor['n'] >= MIN_CONTROL_PAIRS and floor['rms'] > 0:
            dice['no_teach_se'] = dice['mean'] / (floor['rms'] / math.sqrt(dice['n']))
        if draws:
            # against the mean of plain's draws at each seed: the same seed, less of one plain run's spread
            per_seed = {s: by_trainer[name][s]['metrics']['mean']['dice'] - draws[s][0]
                        for s in entry['paired']['seeds'] if s in draws}
            dice['vs_draws'] = dict(spread(list(per_seed.values())), per_seed=per_seed,
                                    draws={s: draws[s][1] for s in per_seed})
    return result


def plain_draws(by_trainer: Dict[str, Dict[int, dict]], baseline: str = BASELINE) -> Dict[int, Tuple[float, int]]:
    """Per seed, ``(mean Dice, count)`` over the baseline's run and its no-teach controls' runs at that seed: each is a
    run of plain nnU-Net on the seed's data and initial weights (the controls' within 1e-6), so their mean is plain's
    Dice at that seed with less of a single run's spread in it."""
    values: Dict[int, List[float]] = {}
    for trainer, runs in by_trainer.items():
        if trainer == baseline or is_control(trainer):
            for seed, r in runs.items():
                d = float(r['metrics']['mean']['dice'])
                if math.isfinite(d):
                    values.setdefault(int(seed), []).append(d)
    return {s: (float(np.mean(v)), len(v)) for s, v in values.items()}


# ---------------------------------------------------------------------------------------------- markdown
def _num(value: float, digits: int) -> str:
    return '–' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def _digits(metric: str) -> int:
    return 3 if metric in ('dice', 'jaccard') else 2


def _mean_sd(stats: dict, digits: int) -> str:
    if not math.isfinite(stats['mean']):
        return '–'
    return _num(stats['mean'], digits) + ('' if not math.isfinite(stats['sd']) else f' ± {_num(stats["sd"], digits)}')


def _signed(value: float, digits: int) -> str:
    return '–' if not math.isfinite(value) else f'{value:+.{digits}f}'


def _delta(stats: Optional[dict], digits: int) -> str:
    if stats is None or not math.isfinite(stats['mean']):
        return '–'
    return _signed(stats['mean'], digits) + ('' if not math.isfinite(stats['sd']) else f' ± {_num(stats["sd"], digits)}')


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '–'
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.1f} min'
    return f'{seconds / 3600:.1f} h'


def markdown(settings: dict, records: List[dict], summary: Optional[dict] = None) -> str:
    """``benchmark.md``: what was run and evaluated, then four tables (accuracy with the paired difference, Dice per
    class, the paired differences seed by seed, cost)."""
    summary = summary or aggregate(records, settings.get('baseline', BASELINE))
    baseline, classes, trainers = summary['baseline'], summary['classes'], summary['trainers']
    ev = settings['evaluation']
    lines = [f'# Benchmark: {settings["dataset"]}, {settings["configuration"]}, plans {settings["plans"]} '
             f'(preset {settings["preset"]}), fold {settings["fold"]}', '',
             f'* Evaluated on: {ev["description"]}.',
             f'* Schedule: {settings["epochs"]} epoch{"s" if settings["epochs"] != 1 else ""} x '
             f'{settings["iterations_per_epoch"]} iterations '
             f'({settings["epochs"] * settings["iterations_per_epoch"]} iterations) for every trainer; device '
             f'{settings["device"]}; prediction with checkpoint_final (no model selection), no test-time '
             f'augmentation.',
             f'* Baseline: plain {baseline} on the same plans, split, schedule and seeds. Spread: mean ± sample SD '
             f'over seeds. Paired Δ: trainer minus {baseline} with the same seed, then mean ± SD of those '
             f'differences (Dice/Jaccard: higher is better; HD95/ASD in mm: lower is better).', '']
    marked = [t for t, e in trainers.items() if e['no_unlabeled_data']]

    def label(t):
        return t + (' †' if t in marked else '')

    floor = summary.get('no_teach')
    yardstick = bool(floor) and floor['n'] >= MIN_CONTROL_PAIRS
    lines += ['## Accuracy (class mean)', '',
              '| trainer | seeds | ' + ' | '.join(METRIC_TITLES[m] for m in METRICS) +
              f' | Δ Dice vs {baseline} | Δ HD95 vs {baseline} |' + (' Δ Dice / no-teach SE |' if yardstick else '') +
              (f" Δ Dice vs {baseline}'s draws |" if floor else ''),
              '|---|---|' + '---|' * (len(METRICS) + 2 + yardstick + bool(floor))]
    for t, e in trainers.items():
        p = e['paired']
        se = _signed(p['mean']['dice'].get('no_teach_se', float('nan')), 1) if p else '–'
        lines.append(f'| {label(t)} | {len(e["seeds"])} | ' +
                     ' | '.join(_mean_sd(e['mean'][m], _digits(m)) for m in METRICS) +
                     f' | {_delta(p and p["mean"]["dice"], 3)} | {_delta(p and p["mean"]["hd95"], 2)} |' +
                     (f' {se} |' if yardstick else '') +
                     (f' {_delta(p and p["mean"]["dice"].get("vs_draws"), 3)} |' if floor else ''))
    if floor:
        lines += ['', '## How far nothing moves a run', '',
                  f'The no-teach controls ({CONTROL_PREFIX}K) are plain {baseline} with its initial weights scaled by '
                  f'1 + 1e-6 N(0, 1): the same data and seeds, nothing taught. Their Δ Dice to {baseline}: ' +
                  ', '.join(f'{_signed(d, 3)} ({short_name(t, baseline)}, seed {s})' for t, s, d in floor['pairs']) +
                  f'; root mean square **{_num(floor["rms"], 3)}** over {floor["n"]} pair'
                  f'{"s" if floor["n"] != 1 else ""}. ' +
                  (f'A mean Δ over n seeds carries a standard error of about {_num(floor["rms"], 3)} / √n from this '
                   f'alone, and "Δ Dice / no-teach SE" is the mean Δ in those units: within ±2 it is not told apart '
                   f'from a change that teaches nothing' +
                   (' (with under 5 control pairs the yardstick is itself rough).' if floor['n'] < 5 else '.') +
                   ' A true difference of 0.01 / 0.02 / 0.05 Dice reaches 2 standard errors after about ' +
                   ' / '.join(str(seeds_to_resolve(floor['rms'], d)) for d in (0.01, 0.02, 0.05)) + ' seeds.'
                   if yardstick else
                   f'Under {MIN_CONTROL_PAIRS} pairs this is no yardstick yet (one control pair may move a run by '
                   f'nothing or by several Dice): add seeds or controls.') +
                  f' "Δ Dice vs {baseline}\'s draws" compares each trainer with the mean of {baseline} and its '
                  f'controls at the same seed, all runs of plain {baseline}: the same seeds, with less of one run\'s '
                  f'spread in the baseline.']
    lines += ['', '## Dice per class', '', '| trainer | ' + ' | '.join(classes) + ' |',
              '|---|' + '---|' * len(classes)]
    for t, e in trainers.items():
        lines.append(f'| {label(t)} | ' + ' | '.join(_mean_sd(e['per_class'][c]['dice'], 3) for c in classes) + ' |')

    paired = [(t, e['paired']) for t, e in trainers.items() if e['paired'] is not None]
    if paired:
        lines += ['', f'## Paired differences to {baseline}, seed by seed', '',
                  '| trainer | seed | Δ Dice | Δ Jaccard | Δ HD95 (mm) | Δ ASD (mm) | ' +
                  ' | '.join(f'Δ Dice {c}' for c in classes) + ' |',
                  '|---|---|' + '---|' * (4 + len(classes))]
    for t, p in paired:
        for s in p['seeds']:
            lines.append(f'| {label(t)} | {s}{" ‡" if s in p.get("other_machine", ()) else ""} | ' +
                         ' | '.join(_signed(p['mean'][m]['per_seed'][s], _digits(m)) for m in METRICS) + ' | ' +
                         ' | '.join(_signed(p['per_class'][c]['dice']['per_seed'][s], 3) for c in classes) + ' |')

    lines += ['', '## Cost', '',
              '| trainer | training time | x plain | s/iteration by phase | peak memory (MB) | x plain |',
              '|---|---|---|---|---|---|']
    for t, e in trainers.items():
        c = e['cost']
        phases = ', '.join(f'{p} {_num(v["mean"], 3)}' for p, v in c['s_per_iteration'].items()) or '–'
        lines.append(f'| {label(t)} | {_duration(c["train_wall_s"]["mean"])} | {_num(c.get("time_x", float("nan")), 2)}'
                     f' | {phases} | {_num(c["peak_memory_mb"]["mean"], 0)} | '
                     f'{_num(c.get("memory_x", float("nan")), 2)} |')
    lines += ['', 'Training time: the epochs of nnU-Net\'s training loop (training and validation iterations, '
                  'checkpoints), summed over interruptions; set-up, unlabelled preprocessing and prediction excluded. '
                  's/iteration: from the end of one training step to the end of the next (data wait included). '
                  f'Peak memory: {settings.get("peak_memory", "see benchmark.json")}.']
    if any(p.get('other_machine') for _, p in paired):
        lines += ['', f'‡ this trainer and {baseline} trained this seed on different machines (`machines` in their '
                      'run.json): a seed\'s numbers repeat on one kind of machine but not across kinds, so such a pair '
                      'carries machine noise as well as the trainers\' difference.']
    if marked:
        lines += ['', '† semi-supervised trainer run on a dataset without unlabelled images (no '
                      '`imagesTrUnlabeled/`): it trained with its supervised terms only.']
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------- figure
def short_name(trainer: str, baseline: str = BASELINE) -> str:
    if trainer == baseline:
        return 'nnU-Net'
    return trainer[len('nnUNetTrainer'):] if trainer.startswith('nnUNetTrainer') and trainer != 'nnUNetTrainer' \
        else trainer


def plot(settings: dict, records: List[dict], path: str, summary: Optional[dict] = None) -> str:
    """``benchmark.png``: per-class and mean Dice (bar = mean over seeds, whisker = SD, dots = seeds), and mean Dice
    against training time (small dots = runs, large = trainer means with SD whiskers)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = summary or aggregate(records, settings.get('baseline', BASELINE))
    trainers, classes = summary['trainers'], summary['classes']
    names = list(trainers)
    colours = plt.get_cmap('tab10')
    fig, (ax_bar, ax_time) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={'width_ratios': [1.6, 1]})
    groups = classes + ['mean']
    width = 0.8 / max(1, len(names))
    for i, t in enumerate(names):
        e = trainers[t]
        stats = [e['per_class'][c]['dice'] for c in classes] + [e['mean']['dice']]
        x = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        means = [s['mean'] for s in stats]
        sds = [s['sd'] if math.isfinite(s['sd']) else 0.0 for s in stats]
        ax_bar.bar(x, means, width * 0.9, yerr=sds, capsize=2, color=colours(i % 10), alpha=0.85,
                   label=short_name(t, summary['baseline']) + (' †' if e['no_unlabeled_data'] else ''))
        for xi, s in zip(x, stats):
            ax_bar.scatter([xi] * len(s['values']), s['values'], s=6, color='k', zorder=3)
    ax_bar.set_xticks(np.arange(len(groups)), groups)
    ax_bar.set_ylabel('Dice')
    finite = [v for t in names for c in classes + [None] for v in
              (trainers[t]['per_class'][c]['dice'] if c else trainers[t]['mean']['dice'])['values'] if math.isfinite(v)]
    low = min(finite) if finite else 0.0
    ax_bar.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.02), 1.0)
    ax_bar.set_title('Dice per class (mean ± SD over seeds; dots: seeds)')

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        hours = max((r['train_wall_s'] for r in records), default=0) > 7200
    scale, unit = (3600.0, 'h') if hours else (60.0, 'min')
    for i, t in enumerate(names):
        runs = [r for r in records if r['trainer'] == t]
        ax_time.scatter([r['train_wall_s'] / scale for r in runs], [r['metrics']['mean']['dice'] for r in runs],
                        s=12, color=colours(i % 10), alpha=0.5)
        e = trainers[t]
        x, y = e['cost']['train_wall_s'], e['mean']['dice']
        ax_time.errorbar(x['mean'] / scale, y['mean'],
                         xerr=(x['sd'] / scale) if math.isfinite(x['sd']) else None,
                         yerr=y['sd'] if math.isfinite(y['sd']) else None, fmt='o', ms=7, capsize=2,
                         color=colours(i % 10))
        ax_time.annotate(short_name(t, summary['baseline']), (x['mean'] / scale, y['mean']), fontsize=8,
                         xytext=(5, 4), textcoords='offset points')
    ax_time.set_xlabel(f'training time ({unit}, {settings["device"]})')
    ax_time.set_ylabel('mean Dice (classes)')
    ax_time.set_title('Mean Dice against training time')
    ax_time.grid(alpha=0.3)
    handles, labels = ax_bar.get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper center', ncol=min(len(names), 7), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.95))
    fig.suptitle(f'{settings["dataset"]} {settings["configuration"]}, {settings["epochs"]}x'
                 f'{settings["iterations_per_epoch"]} iterations, evaluated on {settings["evaluation"]["short"]}',
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return path
