"""benchmarks/archive_results.py: a benchmark folder's records, without models, kept where per_case.py reads them."""
import json
import os

import pytest


@pytest.fixture(scope='module')
def archive_results(load_script):
    return load_script('benchmarks/archive_results.py')


@pytest.fixture(scope='module')
def per_case(load_script):
    return load_script('benchmarks/per_case.py')


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as fh:
        fh.write(data if isinstance(data, str) else json.dumps(data))


def _bench(root, runs, unfinished=()):
    """A benchmark folder: finished runs ``(trainer, seed, dice)`` with records, a model folder and predictions."""
    records = []
    for trainer, seed, dice in runs:
        run = f'{trainer}__seed{seed}'
        records.append({'trainer': trainer, 'seed': seed, 'predictions': f'{run}/predictions',
                        'train_wall_s': 100.0 * (1 + (trainer != 'nnUNetTrainer')), 'peak_memory_mb': 1000.0,
                        's_per_iteration': {'train': 0.1}, 'semi_supervised': trainer != 'nnUNetTrainer',
                        'unlabeled_cases': 5, 'metrics': {
                            'mean': {'dice': dice, 'jaccard': 0.0, 'hd95': 1.0, 'asd': 1.0},
                            'per_class': {'1': {'dice': dice, 'jaccard': 0.0, 'hd95': 1.0, 'asd': 1.0}}}})
        _write(os.path.join(root, run, 'run.json'), records[-1])
        _write(os.path.join(root, run, 'timing.json'), {'train_wall_s': 1.0})
        _write(os.path.join(root, run, 'metrics.json'), {'metric_per_case': [
            {'reference_file': '/l/c0.nii.gz', 'metrics': {'1': {'dice': dice}}}]})
        fold = os.path.join(root, run, 'Dataset001_X', f'{trainer}__nnUNetPlans__2d', 'fold_0')
        _write(os.path.join(fold, 'training_log_2026_1_1_00_00_00.txt'), 'Epoch 0\n')
        _write(os.path.join(fold, 'debug.json'), {'lambda_unsup': '1.0'})
        _write(os.path.join(fold, 'checkpoint_final.pth'), 'weights')
        _write(os.path.join(root, run, 'predictions', 'c0.nii.gz'), 'image')
    for trainer, seed in unfinished:
        _write(os.path.join(root, f'{trainer}__seed{seed}', 'train.log'), 'started')
    settings = {'baseline': 'nnUNetTrainer', 'seeds': sorted({s for _, s, _ in runs} | {s for _, s in unfinished}),
                'trainers': list(dict.fromkeys(['nnUNetTrainer'] + [t for t, _, _ in runs] + [t for t, _ in unfinished]))}
    _write(os.path.join(root, 'benchmark.json'), {'settings': settings, 'runs': records, 'summary': {}})
    _write(os.path.join(root, 'benchmark.md'), '# table\n')
    return root


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_keeps_records_not_models(archive_results, tmp_path):
    out = _bench(str(tmp_path / 'out'), [('nnUNetTrainer', 1, 0.6), ('nnUNetTrainerACTIONpp', 1, 0.7)],
                 unfinished=[('nnUNetTrainerX', 1)])
    dest = str(tmp_path / 'kept')
    assert archive_results.archive(out, dest) == ['nnUNetTrainer__seed1', 'nnUNetTrainerACTIONpp__seed1']
    def run_files(trainer):   # debug.json where the benchmark's check of changed defaults reads it
        return [f'Dataset001_X/{trainer}__nnUNetPlans__2d/fold_0/debug.json', 'metrics.json', 'run.json',
                'timing.json', 'training_log_2026_1_1_00_00_00.txt']
    assert _files(dest) == ['benchmark.json', 'benchmark_seeds1.md'] + \
        [f'nnUNetTrainerACTIONpp__seed1/{f}' for f in run_files('nnUNetTrainerACTIONpp')] + \
        [f'nnUNetTrainer__seed1/{f}' for f in run_files('nnUNetTrainer')]


def test_later_archives_add_runs_and_per_case_reads_them(archive_results, per_case, tmp_path):
    dest = str(tmp_path / 'kept')
    archive_results.archive(_bench(str(tmp_path / 'a'), [('nnUNetTrainer', 0, 0.5),
                                                         ('nnUNetTrainerACTIONpp', 0, 0.8)]), dest)
    archive_results.archive(_bench(str(tmp_path / 'b'), [('nnUNetTrainer', 1, 0.6),
                                                         ('nnUNetTrainerACTIONpp', 1, 0.7)]), dest)
    runs = per_case.load_runs(dest)
    assert [(t, s, d['c0']['1']) for t, s, d in runs] == [
        ('nnUNetTrainer', 0, 0.5), ('nnUNetTrainer', 1, 0.6),
        ('nnUNetTrainerACTIONpp', 0, 0.8), ('nnUNetTrainerACTIONpp', 1, 0.7)]
    assert {'benchmark_seeds0.md', 'benchmark_seeds1.md'} <= set(os.listdir(dest))
    assert '| ACTIONpp s0 | +0.300 |' in per_case.report(runs)


def test_merged_archive_summarises_every_run_and_lists_only_finished_trainers(archive_results, tmp_path):
    dest = str(tmp_path / 'kept')
    archive_results.archive(_bench(str(tmp_path / 'a'), [('nnUNetTrainer', 0, 0.5),
                                                         ('nnUNetTrainerACTIONpp', 0, 0.8)]), dest)
    archive_results.archive(_bench(str(tmp_path / 'b'), [('nnUNetTrainer', 1, 0.6), ('nnUNetTrainerACTIONpp', 1, 0.7)],
                                   unfinished=[('nnUNetTrainerARCO_SAG', 1)]), dest)
    with open(os.path.join(dest, 'benchmark.json')) as fh:
        kept = json.load(fh)
    assert kept['settings']['trainers'] == ['nnUNetTrainer', 'nnUNetTrainerACTIONpp']
    assert kept['settings']['seeds'] == [0, 1]
    action = kept['summary']['trainers']['nnUNetTrainerACTIONpp']
    assert action['seeds'] == [0, 1]
    assert action['paired']['mean']['dice']['per_seed'] == pytest.approx({'0': 0.3, '1': 0.1})
    assert action['paired']['mean']['dice']['mean'] == pytest.approx(0.2)
    assert action['cost']['time_x'] == pytest.approx(2.0)


def test_not_a_benchmark_folder_names_the_fix(archive_results, tmp_path):
    with pytest.raises(SystemExit, match='has no benchmark.json'):
        archive_results.archive(str(tmp_path), str(tmp_path / 'kept'))
