"""benchmarks/per_case.py: per-case Dice tables of a benchmark folder, paired to plain nnU-Net by seed."""
import json
import os

import pytest


@pytest.fixture(scope='module')
def per_case(load_script):
    return load_script('benchmarks/per_case.py')


def _run(out, trainer, seed, dice_by_case):
    folder = os.path.join(out, f'{trainer}__seed{seed}')
    os.makedirs(folder)
    cases = [{'reference_file': f'/x/labels/{case}.nii.gz',
              'metrics': {str(k + 1): {'dice': d} for k, d in enumerate(dices)}}
             for case, dices in dice_by_case.items()]
    with open(os.path.join(folder, 'metrics.json'), 'w') as fh:
        json.dump({'metric_per_case': cases}, fh)
    return {'trainer': trainer, 'seed': seed, 'predictions': f'{trainer}__seed{seed}/predictions'}


def _bench(tmp_path, runs):
    out = str(tmp_path)
    with open(os.path.join(out, 'benchmark.json'), 'w') as fh:
        json.dump({'runs': [_run(out, *r) for r in runs]}, fh)
    return out


def test_paired_summary_numbers(per_case, tmp_path):
    # 6 cases, 2 labels; the trainer gains 0.4 mean Dice on the lowest case, loses 0.1 on the best, ties elsewhere
    plain = {f'c{i}': [0.1 * i, 0.1 * i] for i in range(6)}
    other = dict(plain, c0=[0.4, 0.4], c5=[0.4, 0.4])
    out = _bench(tmp_path, [('nnUNetTrainer', 0, plain), ('nnUNetTrainerX', 0, other)])
    runs = per_case.load_runs(out)
    assert [(t, s) for t, s, _ in runs] == [('nnUNetTrainer', 0), ('nnUNetTrainerX', 0)]
    text = per_case.report(runs, margin=0.05)
    row = next(line for line in text.splitlines() if line.startswith('| X s0 |'))
    # mean Δ = (0.4 - 0.1) / 6 = +0.05; won 1, lost 1; the 5 lowest plain cases (c0..c4) carry +0.4 / 6
    assert row == '| X s0 | +0.050 | 1 | 1 | +0.067 | -0.017 |'
    # cases sorted by plain Dice, lowest first, with per-label values in brackets
    lines = text.splitlines()
    assert lines[4].startswith('| c0 | 0.00 (0.00/0.00) | 0.40 (0.40/0.40) |')


def test_pairs_by_seed_and_filters(per_case, tmp_path):
    a = {'c0': [0.5], 'c1': [0.5]}
    b = {'c0': [0.7], 'c1': [0.5]}
    out = _bench(tmp_path, [('nnUNetTrainer', 0, a), ('nnUNetTrainer', 1, b),
                            ('nnUNetTrainerX', 1, b), ('nnUNetTrainerY', 0, b)])
    text = per_case.report(per_case.load_runs(out), margin=0.05)
    assert '| X s1 | +0.000 | 0 | 0 |' in text      # paired with plain seed 1, not seed 0
    assert '| Y s0 | +0.100 | 1 | 0 |' in text
    only = per_case.load_runs(out, trainers=['nnUNetTrainerX'], seed=1)
    assert [(t, s) for t, s, _ in only] == [('nnUNetTrainer', 1), ('nnUNetTrainerX', 1)]


def test_missing_folder_names_the_fix(per_case, tmp_path):
    with pytest.raises(SystemExit, match='has no benchmark.json'):
        per_case.main([str(tmp_path)])
