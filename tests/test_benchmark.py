"""``nnunet-semiseg benchmark``: the aggregation on hand-built records, the CPU preset's plans, refusals before any
compute, and one tiny end-to-end benchmark on the phantom (plain nnU-Net + Mean Teacher, 1 x 2 iterations) that is
then resumed: a second call trains nothing, a run interrupted after its last checkpoint continues from it; and a
second that pairs plain with Mean Teacher at weight 0 (plain's weights to the bit), at 0.1 and with a no-teach
control (--controls)."""
import json
import math
import os
import shutil

import pytest

from conftest import REPO_ROOT
from nnunet_semiseg.benchmark import runner
from nnunet_semiseg.benchmark.report import aggregate, markdown, seeds_to_resolve

SETTINGS = {'dataset': 'Dataset999_X', 'configuration': '2d', 'plans': 'nnUNetPlans_cpu', 'preset': 'cpu', 'fold': 0,
            'epochs': 4, 'iterations_per_epoch': 250, 'device': 'cpu', 'baseline': 'nnUNetTrainer',
            'evaluation': {'set': 'validation', 'short': 'fold 0 validation', 'description': '10 validation cases'}}


def record(trainer, seed, dice, hd95, wall, memory, per_class_dice, semi=True, unlabeled=5, phases=None):
    return {'trainer': trainer, 'seed': seed, 'train_wall_s': wall, 'peak_memory_mb': memory,
            's_per_iteration': phases or {'train': wall / 1000}, 'semi_supervised': semi, 'unlabeled_cases': unlabeled,
            'metrics': {'mean': {'dice': dice, 'jaccard': dice / (2 - dice), 'hd95': hd95, 'asd': hd95 / 3},
                        'per_class': {c: {'dice': d, 'jaccard': d / (2 - d), 'hd95': hd95, 'asd': hd95 / 3}
                                      for c, d in per_class_dice.items()}}}


RECORDS = [
    record('nnUNetTrainer', 0, 0.80, 5.0, 100.0, 1000.0, {'LV': 0.9, 'RV': 0.7}, semi=False, unlabeled=None),
    record('nnUNetTrainer', 1, 0.70, 7.0, 120.0, 1000.0, {'LV': 0.8, 'RV': 0.6}, semi=False, unlabeled=None),
    record('nnUNetTrainerMONA', 0, 0.85, 4.0, 300.0, 1500.0, {'LV': 0.95, 'RV': 0.75},
           phases={'pretrain': 0.2, 'finetune': 0.5}),
    record('nnUNetTrainerMONA', 1, 0.71, 8.0, 360.0, 1600.0, {'LV': 0.82, 'RV': 0.6},
           phases={'pretrain': 0.2, 'finetune': 0.7}),
    record('nnUNetTrainerMeanTeacher', 1, 0.75, 6.0, 200.0, 1100.0, {'LV': 0.85, 'RV': 0.65}, unlabeled=0),
]


def test_aggregate_spread_over_seeds():
    mona = aggregate(RECORDS)['trainers']['nnUNetTrainerMONA']
    assert mona['seeds'] == [0, 1]
    assert mona['mean']['dice']['mean'] == pytest.approx(0.78)
    assert mona['mean']['dice']['sd'] == pytest.approx(math.sqrt(2 * 0.07 ** 2))  # sample SD of 0.85, 0.71
    assert mona['per_class']['RV']['dice']['mean'] == pytest.approx(0.675)
    assert mona['cost']['s_per_iteration']['finetune']['mean'] == pytest.approx(0.6)


def test_aggregate_paired_differences_per_seed():
    summary = aggregate(RECORDS)
    mona = summary['trainers']['nnUNetTrainerMONA']['paired']
    assert mona['seeds'] == [0, 1]
    assert mona['mean']['dice']['per_seed'] == {0: pytest.approx(0.05), 1: pytest.approx(0.01)}
    assert mona['mean']['dice']['mean'] == pytest.approx(0.03)
    assert mona['mean']['dice']['sd'] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert mona['mean']['hd95']['per_seed'] == {0: pytest.approx(-1.0), 1: pytest.approx(1.0)}
    assert mona['per_class']['LV']['dice']['per_seed'] == {0: pytest.approx(0.05), 1: pytest.approx(0.02)}
    # only the seed both have is paired; one difference has no spread
    mt = summary['trainers']['nnUNetTrainerMeanTeacher']['paired']
    assert mt['seeds'] == [1] and mt['mean']['dice']['mean'] == pytest.approx(0.05)
    assert math.isnan(mt['mean']['dice']['sd'])
    assert summary['trainers']['nnUNetTrainer']['paired'] is None


def test_aggregate_cost_multiples_of_plain_on_the_same_seeds():
    trainers = aggregate(RECORDS)['trainers']
    assert trainers['nnUNetTrainerMONA']['cost']['time_x'] == pytest.approx(330 / 110)
    assert trainers['nnUNetTrainerMONA']['cost']['memory_x'] == pytest.approx(1.55)
    assert trainers['nnUNetTrainerMeanTeacher']['cost']['time_x'] == pytest.approx(200 / 120)  # seed 1 only
    assert trainers['nnUNetTrainer']['cost']['time_x'] == 1.0


def test_markdown_rows_and_marks():
    md = markdown(SETTINGS, RECORDS)
    accuracy = md.split('## Accuracy')[1].split('##')[0]
    rows = [line for line in accuracy.splitlines() if line.startswith('| nnUNet')]
    assert [r.split(' | ')[0] for r in rows] == ['| nnUNetTrainer', '| nnUNetTrainerMONA',
                                                 '| nnUNetTrainerMeanTeacher †']
    assert '0.780 ± 0.099' in rows[1] and '+0.030 ± 0.028' in rows[1]
    assert '10 validation cases' in md and 'without unlabelled images' in md
    paired = md.split('seed by seed')[1].split('##')[0]
    assert '| nnUNetTrainerMONA | 0 | +0.050 |' in paired and '| nnUNetTrainerMONA | 1 | +0.010 |' in paired
    assert '| 3.00 |' in md.split('## Cost')[1]  # MONA's time as a multiple of plain


def test_pairs_trained_on_different_machines_are_flagged():
    cpu_a = {'cpu': 'Xeon', 'cpu_flags_sha1': 'aaa', 'torch_cpu_capability': 'AVX512', 'threads': 2, 'torch': '2.14.1'}
    cpu_b = dict(cpu_a, cpu_flags_sha1='bbb', torch_cpu_capability='AVX2')
    records = [dict(r) for r in RECORDS]
    records[0]['machines'] = [cpu_a]           # plain, seed 0
    records[1]['machines'] = [cpu_a]           # plain, seed 1
    records[2]['machines'] = [dict(cpu_a)]     # MONA seed 0: the same kind of machine (equal fingerprint)
    records[3]['machines'] = [cpu_a, cpu_b]    # MONA seed 1: resumed on another machine
    # Mean Teacher's seed 1 predates the field: unknown, not flagged
    summary = aggregate(records)
    assert summary['trainers']['nnUNetTrainerMONA']['paired']['other_machine'] == [1]
    assert summary['trainers']['nnUNetTrainerMeanTeacher']['paired']['other_machine'] == []
    md = markdown(SETTINGS, records, summary)
    paired = md.split('seed by seed')[1].split('##')[0]
    assert '| nnUNetTrainerMONA | 0 | +0.050 |' in paired and '| nnUNetTrainerMONA | 1 ‡ | +0.010 |' in paired
    assert '‡ this trainer and nnUNetTrainer trained this seed on different machines' in md
    assert '‡' not in markdown(SETTINGS, RECORDS)  # records without machines: no flag, no footnote


def test_no_teach_controls_are_the_yardstick_of_every_paired_difference():
    # plain, two controls (plain with jittered initial weights) and a trainer, seeds 0 and 1
    records = [record('nnUNetTrainer', 0, 0.60, 5.0, 100.0, 1000.0, {'LV': 0.6}, semi=False, unlabeled=None),
               record('nnUNetTrainer', 1, 0.62, 5.0, 100.0, 1000.0, {'LV': 0.62}, semi=False, unlabeled=None),
               record('nnUNetTrainer_jitter1', 0, 0.64, 5.0, 100.0, 1000.0, {'LV': 0.64}, semi=False, unlabeled=None),
               record('nnUNetTrainer_jitter1', 1, 0.60, 5.0, 100.0, 1000.0, {'LV': 0.60}, semi=False, unlabeled=None),
               record('nnUNetTrainer_jitter2', 0, 0.63, 5.0, 100.0, 1000.0, {'LV': 0.63}, semi=False, unlabeled=None),
               record('nnUNetTrainer_jitter2', 1, 0.62, 5.0, 100.0, 1000.0, {'LV': 0.62}, semi=False, unlabeled=None),
               record('nnUNetTrainerX', 0, 0.70, 4.0, 300.0, 1500.0, {'LV': 0.70}),
               record('nnUNetTrainerX', 1, 0.68, 4.0, 300.0, 1500.0, {'LV': 0.68})]
    summary = aggregate(records)
    floor = summary['no_teach']
    # the controls' differences +0.04, -0.02, +0.03, 0.00 scatter about zero: their root mean square, not their SD
    assert floor['n'] == 4 and floor['rms'] == pytest.approx(math.sqrt(7.25e-4))
    x = summary['trainers']['nnUNetTrainerX']['paired']['mean']['dice']
    assert x['no_teach_se'] == pytest.approx(0.08 / (math.sqrt(7.25e-4) / math.sqrt(2)))  # 4.20
    assert 'no_teach_se' not in summary['trainers']['nnUNetTrainer_jitter1']['paired']['mean']['dice']
    md = markdown(SETTINGS, records, summary)
    accuracy = md.split('## Accuracy')[1].split('##')[0]
    assert '| Δ Dice / no-teach SE |' in accuracy
    assert [line.rsplit('|', 3)[1].strip() for line in accuracy.splitlines() if line.startswith('| nnUNet')] == \
        ['–', '–', '–', '+4.2']
    # against the mean of plain's draws at each seed (plain and both controls): 0.70 - 0.6233, 0.68 - 0.6133
    draws = x['vs_draws']
    assert draws['per_seed'] == pytest.approx({0: 0.70 - 1.87 / 3, 1: 0.68 - 1.84 / 3})
    assert draws['draws'] == {0: 3, 1: 3} and draws['mean'] == pytest.approx(0.071667, abs=1e-6)
    assert "| Δ Dice vs nnUNetTrainer's draws |" in accuracy
    assert [line.rsplit('|', 2)[1].strip() for line in accuracy.splitlines() if line.startswith('| nnUNet')] == \
        ['–', '–', '–', '+0.072 ± 0.007']
    assert 'vs_draws' not in summary['trainers']['nnUNetTrainer_jitter1']['paired']['mean']['dice']
    section = md.split('## How far nothing moves a run')[1].split('##')[0]
    assert '+0.040 (_jitter1, seed 0)' in section and 'root mean square **0.027** over 4 pairs' in section
    assert 'yardstick is itself rough' in section
    # seeds a difference needs to stand out: (2 rms / d)^2 = 4 x 7.25e-4 / d^2 = 29.0, 7.25, 1.16 -> 29, 8, 2
    assert 'after about 29 / 8 / 2 seeds' in section
    assert [seeds_to_resolve(0.02, d) for d in (0.01, -0.02, 0.04, 0.1)] == [16, 4, 1, 1]
    with pytest.raises(ValueError):
        seeds_to_resolve(0.02, 0.0)
    # with under 3 control pairs the pairs are listed, but used as no yardstick
    few = aggregate(records[:4] + records[6:])   # plain, _jitter1 and X: 2 pairs
    assert few['no_teach']['n'] == 2
    assert 'no_teach_se' not in few['trainers']['nnUNetTrainerX']['paired']['mean']['dice']
    md = markdown(SETTINGS, records[:4] + records[6:], few)
    assert 'no-teach SE' not in md and 'Under 3 pairs this is no yardstick yet' in md
    # one control is already a second draw of plain at its seeds: (0.70 - 0.62) and (0.68 - 0.61)
    assert few['trainers']['nnUNetTrainerX']['paired']['mean']['dice']['vs_draws']['mean'] == pytest.approx(0.075)
    # without controls: no yardstick, no column, no section
    assert aggregate(RECORDS)['no_teach'] is None
    assert 'no-teach' not in markdown(SETTINGS, RECORDS)


def test_a_control_jitters_each_weight_by_its_own_rounding_sized_factor():
    import torch
    from nnunet_semiseg.training.controls import jitter_

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.InstanceNorm2d(8, affine=True))
        with torch.no_grad():
            m[0].bias[:2] = 0
        return m

    plain, a, b, c = model(), model(), model(), model()
    jitter_(a, 1e-6, torch.Generator().manual_seed(1))
    jitter_(b, 1e-6, torch.Generator().manual_seed(1))
    jitter_(c, 1e-6, torch.Generator().manual_seed(2))
    for p0, pa, pb, pc in zip(plain.parameters(), a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)                                 # one generator seed, one perturbation
        nonzero = p0 != 0
        assert torch.equal(pa[~nonzero], p0[~nonzero])             # a relative jitter leaves zeros (norm biases) at 0
        if not nonzero.any():
            continue
        assert not torch.equal(pa, pc)                             # another seed, another draw
        relative = (pa - p0)[nonzero] / p0[nonzero]
        assert 0 < float(relative.abs().max()) < 7e-6             # |N(0, 1)| < 7 at these sizes
        assert float(relative.std()) == pytest.approx(1e-6, rel=0.5)


def test_machine_fingerprint_is_stable_and_json():
    import torch

    from nnunet_semiseg.benchmark.child import machine_fingerprint
    first = machine_fingerprint(torch.device('cpu'))
    assert first == machine_fingerprint(torch.device('cpu'))
    assert json.loads(json.dumps(first)) == first
    assert first['threads'] == torch.get_num_threads() and first['torch'] == torch.__version__
    assert 'gpu' not in first and first['cpu']


def test_peak_memory_is_rounded_once_at_the_source(monkeypatch):
    """CI once failed on 2155.2 <= 2155.16: an epoch's record rounded, the run's peak not. Rounding in
    peak_memory_mb gives every record the same number for the same reading."""
    import types
    import torch
    from nnunet_semiseg.benchmark import child
    monkeypatch.setattr(child.sys, 'platform', 'linux')
    monkeypatch.setattr(child.resource, 'getrusage', lambda who: types.SimpleNamespace(ru_maxrss=2206884))  # KiB
    assert child.peak_memory_mb(torch.device('cpu')) == 2155.2  # 2155.16015625 MB


def test_run_timer_records_where_the_peak_rises(tmp_path, monkeypatch):
    """Per epoch: the peak after its training steps, after validation/checkpoint, the memory held; and the steps
    (or epoch ends) where the peak rose by PEAK_RISE_MB or more. Continued runs extend the same records."""
    import torch

    from nnunet_semiseg.benchmark import child

    class Trainer:
        current_epoch, num_epochs = 0, 2

        def train_step(self, batch):
            return batch

        def on_train_epoch_start(self):
            pass

        def on_epoch_end(self):
            self.current_epoch += 1

    peaks = iter([100.0, 110.0, 300.0, 320.0, 400.0,   # epoch 1: steps 1-4, then its end (validation)
                  400.0, 420.0, 500.0, 500.0, 500.0])  # epoch 2
    monkeypatch.setattr(child, 'peak_memory_mb', lambda device: next(peaks))
    monkeypatch.setattr(child, 'current_memory_mb', lambda device: 250.0)
    path = str(tmp_path / 'timing.json')
    trainer = Trainer()
    child.RunTimer(path, trainer, torch.device('cpu'))
    for _ in range(2):
        trainer.on_train_epoch_start()
        for step in range(4):
            assert trainer.train_step(step) == step
        trainer.on_epoch_end()
    state = json.load(open(path))
    assert state['peak_memory_mb'] == 500.0
    assert state['memory_by_epoch'] == [
        {'epoch': 1, 'train_peak_mb': 320.0, 'epoch_peak_mb': 400.0, 'rss_mb': 250.0},
        {'epoch': 2, 'train_peak_mb': 500.0, 'epoch_peak_mb': 500.0, 'rss_mb': 250.0}]
    # 110 is under 32 MB above 100, 320 under 32 above 300, 420 under 32 above 400
    assert [(r['epoch'], r['where'], r['peak_mb']) for r in state['peak_rises']] == [
        (1, 1, 100.0), (1, 3, 300.0), (1, 'epoch_end', 400.0), (2, 3, 500.0)]
    assert state['phases']['train']['steps'] == 8

    # a continued run keeps the records and measures rises from the last one
    peaks = iter([520.0, 540.0])
    monkeypatch.setattr(child, 'peak_memory_mb', lambda device: next(peaks))
    trainer = Trainer()
    trainer.current_epoch = 2
    child.RunTimer(path, trainer, torch.device('cpu'))
    trainer.on_train_epoch_start()
    trainer.train_step(0)
    trainer.on_epoch_end()
    state = json.load(open(path))
    assert len(state['memory_by_epoch']) == 3 and state['peak_rises'][-1] == {'epoch': 3, 'where': 'epoch_end',
                                                                              'peak_mb': 540.0}
    assert len(state['peak_rises']) == 5


def test_eta_of_a_semi_supervised_trainer_scales_plains_time():
    def run(trainer, seed, wall, semi=True, sessions=1):
        return {'trainer': trainer, 'seed': seed, 'last_session_wall_s': wall, 'semi_supervised': semi,
                'sessions': sessions}
    plain = [run('nnUNetTrainer', 0, 100.0, semi=False), run('nnUNetTrainer', 1, 140.0, semi=False)]
    assert runner._estimate('nnUNetTrainerARCO_SAG', [], 'nnUNetTrainer', True) is None
    assert runner._estimate('nnUNetTrainer', plain, 'nnUNetTrainer') == 120.0
    # before any semi-supervised run has finished: plain's mean x the measured whole-run multiple
    assert runner._estimate('nnUNetTrainerARCO_SAG', plain, 'nnUNetTrainer', True) == 360.0
    assert runner._estimate('nnUNetTrainer_5epochs', plain, 'nnUNetTrainer', False) == 120.0
    # then: the multiple the folder's own semi-supervised runs measured (a continued run's time is not one run's)
    records = plain + [run('nnUNetTrainerACTIONpp', 0, 300.0), run('nnUNetTrainerMeanTeacher', 0, 240.0),
                       run('nnUNetTrainerMONA', 0, 9999.0, sessions=2)]
    assert runner._estimate('nnUNetTrainerARCO_SAG', records, 'nnUNetTrainer', True) == pytest.approx(120.0 * 2.25)
    assert runner._estimate('nnUNetTrainerACTIONpp', records, 'nnUNetTrainer', True) == 300.0


def test_cpu_preset_plans():
    plans = {'plans_name': 'nnUNetPlans', 'configurations': {
        '2d': {'data_identifier': 'nnUNetPlans_2d', 'batch_size': 13, 'patch_size': [256, 224],
               'architecture': {'arch_kwargs': {'n_stages': 7, 'features_per_stage': [32, 64, 128, 256, 512, 512,
                                                                                      512]}}},
        '3d_fullres': {'data_identifier': 'nnUNetPlans_3d_fullres', 'batch_size': 2, 'patch_size': [10, 256, 224],
                       'architecture': {'arch_kwargs': {'n_stages': 4, 'features_per_stage': [8, 64, 128, 320]}}},
        '3d_cascade_fullres': {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}}}
    cpu = runner.derive_cpu_plans(plans, 'nnUNetPlans_cpu')
    assert cpu['plans_name'] == 'nnUNetPlans_cpu' and plans['plans_name'] == 'nnUNetPlans'
    two, three = cpu['configurations']['2d'], cpu['configurations']['3d_fullres']
    assert two['architecture']['arch_kwargs']['features_per_stage'] == [16, 32, 64, 128, 256, 256, 256]
    assert three['architecture']['arch_kwargs']['features_per_stage'] == [8, 32, 64, 128]  # a cap, never a raise
    assert (two['batch_size'], three['batch_size']) == (4, 2)
    assert two['patch_size'] == [256, 224] and two['data_identifier'] == 'nnUNetPlans_2d'
    assert cpu['configurations']['3d_cascade_fullres'] == plans['configurations']['3d_cascade_fullres']


def test_out_with_other_settings_or_foreign_files_is_refused(tmp_path):
    settings = {k: 1 for k in runner.COMPARED}
    (tmp_path / 'bench').mkdir()
    (tmp_path / 'bench' / 'benchmark.json').write_text(json.dumps({'settings': dict(settings, epochs=2), 'runs': []}))
    with pytest.raises(runner.BenchmarkInputError, match=r'other settings \(epochs 2 there, 1 here\).*another -o'):
        runner.check_out(str(tmp_path / 'bench'), settings)
    assert runner.check_out(str(tmp_path / 'bench'), dict(settings, epochs=2)) is not None
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    with pytest.raises(runner.BenchmarkInputError, match='holds no benchmark.json'):
        runner.check_out(str(tmp_path / 'mine'), settings)
    assert runner.check_out(str(tmp_path / 'new'), settings) is None


def test_setting_differences_compare_settings_not_training_state():
    from nnunet_semiseg.benchmark.child import setting_differences

    class Trainer:
        def __init__(self):
            self.lambda_anco, self.use_ascl, self.sampler = 0.1, True, 'sag'
            self.current_epoch, self.semiseg_step = 0, 0               # training state
            self.optimizer, self._private = None, 3                    # set when training starts; private
            self.output_folder = os.path.join('results', 'fold_0')     # a path
            self.new_setting = 2                                        # not in an older run's record

    recorded = {'lambda_anco': '0.01', 'use_ascl': 'True', 'sampler': 'sg', 'current_epoch': '3',
                'semiseg_step': '750', 'optimizer': 'SGD (...)', '_private': '4',
                'output_folder': os.path.join('elsewhere', 'fold_0')}
    assert setting_differences(recorded, Trainer()) == [('lambda_anco', '0.01', '0.1'), ('sampler', 'sg', 'sag')]


def _no_training(*args, **kwargs):
    raise AssertionError('a run was started')


def test_bad_input_is_refused_before_any_compute(phantom, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, '_run_child', _no_training)
    out = tmp_path / 'out'
    with pytest.raises(runner.BenchmarkInputError, match="unknown trainer 'nnUNetTrainerMONAA'.*spelling"):
        runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMONAA'], str(out))
    with pytest.raises(runner.BenchmarkInputError, match="configuration '3d_lowres'.*has 2d, 3d_fullres"):
        runner.run_benchmark(phantom['id'], '3d_lowres', ['nnUNetTrainerMeanTeacher'], str(out))
    with pytest.raises(runner.BenchmarkInputError, match="plans 'nnUNetPlans_nope'.*nnUNetv2_plan_and_preprocess"):
        runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), plans='nnUNetPlans_nope')
    with pytest.raises(runner.BenchmarkInputError, match="dataset '977'.*nnUNetv2_plan_and_preprocess -d 977"):
        runner.run_benchmark(977, '2d', ['nnUNetTrainerMeanTeacher'], str(out))
    with pytest.raises(runner.BenchmarkInputError, match=r"--controls 4: at most 3 .*more --seeds"):
        runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), controls=4)
    assert not out.exists()


def test_validation_cases_are_linked_in_nnunet_naming(phantom, tmp_path):
    spec = {'raw_folder': phantom['raw'], 'preprocessed_folder': phantom['preprocessed'], 'fold': 0,
            'out': str(tmp_path), 'evaluation': {'set': 'validation'}}
    images, labels, n = runner.evaluation_folders(spec)
    assert n == len(phantom['cases']['val'])
    assert sorted(os.listdir(labels)) == [f'{c}.nii.gz' for c in phantom['cases']['val']]
    assert sorted(os.listdir(images)) == [f'{c}_0000.nii.gz' for c in phantom['cases']['val']]


def test_benchmark_end_to_end_and_resume(phantom, tmp_path, monkeypatch):
    out = tmp_path / 'bench'
    lines = []
    kwargs = dict(seeds=[0], epochs=1, iterations=2, val_iterations=1, preset='cpu', device='cpu', echo=lines.append)
    data = runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), **kwargs)
    assert data['failed'] == []

    settings = data['settings']
    assert (settings['plans'], settings['epochs'], settings['iterations_per_epoch']) == ('nnUNetPlans_cpu', 1, 2)
    assert settings['evaluation']['set'] == 'test'  # the phantom has imagesTs/labelsTs
    cpu_plans = json.load(open(os.path.join(phantom['preprocessed'], 'nnUNetPlans_cpu.json')))
    assert cpu_plans['configurations']['2d']['batch_size'] == 4
    assert [(r['trainer'], r['seed']) for r in data['runs']] == [('nnUNetTrainer', 0), ('nnUNetTrainerMeanTeacher', 0)]
    for r in data['runs']:
        assert r['iterations'] == 2 and sum(r['steps_per_phase'].values()) == 2
        assert r['train_wall_s'] > 0 and r['peak_memory_mb'] > 100 and r['s_per_iteration']['train'] > 0
        assert set(r['metrics']['per_class']) == {'LV', 'MYO', 'RV'}
        assert 0 <= r['metrics']['mean']['dice'] <= 1
        assert len(r['machines']) == 1 and r['machines'][0]['threads'] >= 1  # the one machine that trained it
        run_dir = out / f'{r["trainer"]}__seed0'
        timing = json.load(open(run_dir / 'timing.json'))
        (epoch,) = timing['memory_by_epoch']
        assert epoch['epoch'] == 1 and 100 < epoch['train_peak_mb'] <= epoch['epoch_peak_mb'] <= r['peak_memory_mb']
        assert epoch['rss_mb'] <= epoch['epoch_peak_mb']
        assert timing['peak_rises'][0]['where'] == 1  # the first step sets the first peak
        assert sorted(os.listdir(run_dir / 'predictions')) == sorted(f'{c}.nii.gz' for c in phantom['cases']['test'])
        model = run_dir / phantom['name'] / f'{r["trainer"]}__nnUNetPlans_cpu__2d' / 'fold_0'
        assert (model / 'checkpoint_final.pth').is_file()  # the model folder lives under OUT
    assert data['runs'][1]['semi_supervised'] and data['runs'][1]['unlabeled_cases'] == len(phantom['cases']['unlabeled'])
    on_disk = json.load(open(out / 'benchmark.json'))
    assert set(on_disk) >= {'settings', 'runs'} and len(on_disk['runs']) == 2
    md = (out / 'benchmark.md').read_text()
    assert '| nnUNetTrainer | 1 |' in md and '| nnUNetTrainerMeanTeacher | 1 |' in md
    assert (out / 'benchmark.png').stat().st_size > 10_000
    assert any('ETA' in line for line in lines)

    # a second call trains nothing
    monkeypatch.setattr(runner, '_run_child', _no_training)
    again = runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), **kwargs)
    assert again['runs'] == data['runs']
    # a run made with other trainer settings (here: as if Mean Teacher's default weight had changed since) is
    # neither skipped nor continued: refused, naming the run and the setting, before anything runs
    debug = out / 'nnUNetTrainerMeanTeacher__seed0' / phantom['name'] / \
        'nnUNetTrainerMeanTeacher__nnUNetPlans_cpu__2d' / 'fold_0' / 'debug.json'
    recorded = json.loads(debug.read_text())
    assert recorded['consistency_weight'] == '0.1'
    debug.write_text(json.dumps(dict(recorded, consistency_weight='0.5')))
    with pytest.raises(runner.BenchmarkInputError,
                       match=r'(?s)1 run\(s\).*nnUNetTrainerMeanTeacher seed 0 .*consistency_weight 0.5 there, 0.1 now'):
        runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), **kwargs)
    debug.write_text(json.dumps(recorded))
    # other settings on the same OUT: refused, nothing touched
    before = (out / 'benchmark.json').read_text()
    with pytest.raises(runner.BenchmarkInputError, match='other settings'):
        runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), **dict(kwargs, epochs=2))
    assert (out / 'benchmark.json').read_text() == before
    monkeypatch.undo()

    # interrupted after its last checkpoint: the run continues from checkpoint_latest (nnUNetv2_train --c)
    run_dir = out / 'nnUNetTrainerMeanTeacher__seed0'
    fold = run_dir / phantom['name'] / 'nnUNetTrainerMeanTeacher__nnUNetPlans_cpu__2d' / 'fold_0'
    shutil.move(fold / 'checkpoint_final.pth', fold / 'checkpoint_latest.pth')
    (run_dir / 'run.json').unlink()
    lines.clear()
    resumed = runner.run_benchmark(phantom['id'], '2d', ['nnUNetTrainerMeanTeacher'], str(out), **kwargs)
    assert any('nnUNetTrainer seed 0: finished earlier, skipped' in line for line in lines)
    assert any('continuing from checkpoint_latest.pth at epoch 1/1' in line for line in lines)
    record = resumed['runs'][1]
    assert record['sessions'] == 2 and record['steps_per_phase'] == data['runs'][1]['steps_per_phase']
    assert record['metrics']['mean']['dice'] == data['runs'][1]['metrics']['mean']['dice']  # same weights
    assert record['machines'] == data['runs'][1]['machines']  # continued on the same machine: still one


def test_a_trainer_whose_terms_are_off_trains_plains_weights(phantom, tmp_path, monkeypatch):
    # A benchmark pairs each trainer with plain nnU-Net at the same seed: the same initial weights and the same
    # labelled batches (seeded augmentation workers per loader; the unlabelled stream has workers of its own), and
    # network passes of plain's rows. So Mean Teacher with its weight at 0 takes plain's steps to the bit, and a
    # paired difference is the method's change, amplified by the run (docs/tuning.md runs 55 and 78).
    import torch
    monkeypatch.setenv('nnUNet_n_proc_DA', '2')  # the default on the 2-core machines of docs/tuning.md
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(
        [os.environ.get('nnUNet_extTrainer', ''), os.path.join(REPO_ROOT, 'benchmarks', 'tuning_trainers')]))
    out = tmp_path / 'bench'
    trainers = ['nnUNetTrainerMeanTeacher_w0', 'nnUNetTrainerMeanTeacher']   # the second: its term on
    data = runner.run_benchmark(phantom['id'], '2d', trainers, str(out), seeds=[0], epochs=1, iterations=3,
                                val_iterations=1, preset='cpu', device='cpu', controls=1, echo=lambda line: None)
    assert data['failed'] == []
    weights = {}
    for trainer in ['nnUNetTrainer'] + trainers + ['nnUNetTrainer_jitter1']:
        checkpoint = out / f'{trainer}__seed0' / phantom['name'] / f'{trainer}__nnUNetPlans_cpu__2d' / 'fold_0' / \
            'checkpoint_final.pth'
        weights[trainer] = torch.load(checkpoint, map_location='cpu', weights_only=False)['network_weights']
    plain, off, on = (weights[t] for t in ['nnUNetTrainer'] + trainers)
    assert plain.keys() == off.keys() == on.keys()
    assert [k for k in plain if not torch.equal(plain[k], off[k])] == []
    # the term at 0.1 moves the weights, by far less than a step (its gradient is ~1e-4 of the supervised one)
    apart = max(float((plain[k].float() - on[k].float()).abs().max()) for k in plain)
    assert 0 < apart < 1e-2
    # so does the no-teach control (--controls 1), whose initial weights were 1e-6 apart: the yardstick's row
    control = weights['nnUNetTrainer_jitter1']
    assert 0 < max(float((plain[k].float() - control[k].float()).abs().max()) for k in plain) < 1e-2
    dice = {r['trainer']: r['metrics']['mean']['dice'] for r in data['runs']}
    assert dice['nnUNetTrainer'] == dice['nnUNetTrainerMeanTeacher_w0']
    assert data['summary']['no_teach']['n'] == 1
    assert '## How far nothing moves a run' in (out / 'benchmark.md').read_text()
