"""benchmarks/bench_trainers.py: the unlabelled-loader wait it records and the table it prints (no timing here)."""
import argparse
import os

import pytest


@pytest.fixture(scope='module')
def bench(load_script):
    return load_script('benchmarks/bench_trainers.py')


def test_timed_loader_records_one_wait_per_batch_and_delegates(bench):
    class Loader:
        def __init__(self):
            self.finished = False
            self.items = iter(range(3))

        def __next__(self):
            return next(self.items)

        def _finish(self):
            self.finished = True

    inner = Loader()
    loader = bench.TimedLoader(inner)
    assert [next(loader), next(loader)] == [0, 1]
    assert len(loader.waits) == 2 and all(w >= 0 for w in loader.waits)
    loader._finish()                       # nnU-Net's augmenters are shut down through the wrapper
    assert inner.finished


def test_table_multiples_with_and_without_the_wait(bench):
    args = argparse.Namespace(dataset='27', configuration='2d', plans='p', device='cpu', iterations=4, warmup=1,
                              statistic='median')
    rows = [{'trainer': 'nnUNetTrainer', 'seconds': {'-': 0.5}, 'whole_s': 0.5, 'pretrain_share': 0.0,
             'peak_mb': 1000.0, 'whole_wait_s': 0.0, 'whole_without_wait_s': 0.5, 'batch': 4, 'patch': [8, 8]},
            {'trainer': 'nnUNetTrainerX', 'seconds': {'pretrain': 1.0, 'finetune': 2.0}, 'whole_s': 1.75,
             'pretrain_share': 0.25, 'peak_mb': 1500.0, 'whole_wait_s': 0.25, 'whole_without_wait_s': 1.5,
             'batch': 4, 'patch': [8, 8]}]
    text = bench.table(rows, args)
    assert '| nnUNetTrainerX | 1.000 | 2.000 | 1.750 (0.25 / 0.75) | 3.50 | 1500 | 1.50 | 0.250 | 1.500 | 3.00 |' \
        in text
    assert '| nnUNetTrainer | - | - | 0.500 | 1.00 | 1000 | 1.00 | 0.000 | 0.500 | 1.00 |' in text


def test_table_on_cpu_adds_peak_tensor_memory_beside_rss(bench):
    args = argparse.Namespace(dataset='27', configuration='2d', plans='p', device='cpu', iterations=4, warmup=1,
                              statistic='median')
    rows = [{'trainer': 'nnUNetTrainer', 'seconds': {'-': 0.5}, 'whole_s': 0.5, 'pretrain_share': 0.0,
             'peak_mb': 1000.0, 'tensor_peak_mb': 200.0, 'whole_wait_s': 0.0, 'whole_without_wait_s': 0.5,
             'batch': 4, 'patch': [8, 8]},
            {'trainer': 'nnUNetTrainerY', 'seconds': {'-': 1.0}, 'whole_s': 1.0, 'pretrain_share': 0.0,
             'peak_mb': 1300.0, 'tensor_peak_mb': 500.0, 'whole_wait_s': 0.0, 'whole_without_wait_s': 1.0,
             'batch': 4, 'patch': [8, 8]}]
    text = bench.table(rows, args)
    assert '| nnUNetTrainerY | - | - | 1.000 | 2.00 | 1300 | 1.30 | 0.000 | 1.000 | 2.00 | 500 | 2.50 |' in text
    assert 'peak tensors (MB)' in text
    # on CUDA the allocator's peak is already the tensors' peak: no second column
    assert 'peak tensors' not in bench.table(rows, argparse.Namespace(**dict(vars(args), device='cuda')))


def _row(trainer, whole, pre=None, fine=None, peak=1000.0):
    seconds = {'-': whole} if pre is None else {'pretrain': pre, 'finetune': fine}
    return {'trainer': trainer, 'seconds': seconds, 'whole_s': whole, 'pretrain_share': 0.0 if pre is None else 1 / 3,
            'peak_mb': peak, 'tensor_peak_mb': None, 'whole_wait_s': 0.0, 'whole_without_wait_s': whole,
            'batch': 4, 'patch': [8, 8]}


def test_rounds_take_each_multiple_within_its_round(bench):
    # plain drifts 0.5 -> 1.0 s between rounds and the trainer with it: within each round it is 3x and 2x; the
    # medians of separate runs (3.0 / 0.75 = 4x) would mix the drift into the multiple
    rounds = [[_row('nnUNetTrainer', 0.5), _row('nnUNetTrainerX', 1.5, 1.2, 1.65, peak=1400.0)],
              [_row('nnUNetTrainerX', 2.0, 1.7, 2.15, peak=1500.0), _row('nnUNetTrainer', 1.0)],
              [_row('nnUNetTrainer', 0.8), _row('nnUNetTrainerX', 2.4, 2.1, 2.55, peak=1450.0)]]
    rows = {r['trainer']: r for r in bench.combine_rounds(rounds)}
    x = rows['nnUNetTrainerX']
    assert x['round_multiples'] == pytest.approx([3.0, 2.0, 3.0])
    assert x['whole_s'] == pytest.approx(2.0) and x['seconds'] == pytest.approx({'pretrain': 1.7, 'finetune': 2.15})
    assert x['peak_mb'] == 1500.0 and x['tensor_peak_mb'] is None
    assert rows['nnUNetTrainer']['round_multiples'] == pytest.approx([1.0, 1.0, 1.0])
    args = argparse.Namespace(dataset='27', configuration='2d', plans='p', device='cpu', iterations=4, warmup=1,
                              statistic='median')
    text = bench.table(list(rows.values()), args)
    assert text.splitlines()[3].endswith('| 1.00 (1.00-1.00) |')
    assert text.splitlines()[4].endswith('| 2.50 | 1500 | 1.50 | 0.000 | 2.000 | 2.50 | 3.00 (2.00-3.00) |')
    assert '3 rounds' in text
