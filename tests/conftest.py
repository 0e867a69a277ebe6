"""Shared fixtures: a tiny phantom dataset (labelled, unlabelled, test cases), planned and preprocessed by
nnU-Net's own API for 2d and 3d_fullres, with a CPU-sized derived plans file. Built once per test session."""
import json
import os
import tempfile

# nnU-Net reads these at import time: one worker for its pools, in-process augmentation (CPU CI, 2 cores)
os.environ.setdefault('nnUNet_def_n_proc', '1')
os.environ.setdefault('nnUNet_n_proc_DA', '0')
_session_root = tempfile.mkdtemp(prefix='nnunet_semiseg_tests_')
for _var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
    os.environ.setdefault(_var, os.path.join(_session_root, _var))
    os.makedirs(os.environ[_var], exist_ok=True)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def load_script():
    """``load_script('benchmarks/x.py')``: a script outside the package (benchmarks/, tuning variants) imported
    as a module from its path relative to the repository root."""
    import importlib.util

    def load(relative_path: str):
        path = os.path.join(REPO_ROOT, relative_path)
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


PHANTOM_ID = 991
PHANTOM_NAME = 'Dataset991_TestPhantom'
TINY_PLANS = 'nnUNetPlans_tiny'


@pytest.fixture(scope='session')
def phantom():
    """dict(raw=..., preprocessed=..., name=..., cases=..., plans=TINY_PLANS) of a planned phantom dataset."""
    from nnunet_semiseg.demo import make_phantom_dataset, plan_and_preprocess, write_cpu_plans, write_split

    raw, pre = os.environ['nnUNet_raw'], os.environ['nnUNet_preprocessed']
    folder, cases = make_phantom_dataset(raw, PHANTOM_ID, 'TestPhantom', n_labeled=4, n_val=2, n_unlabeled=4,
                                         n_test=2, shape=(8, 32, 32), seed=1)
    split_file = write_split(pre, PHANTOM_NAME, cases['train'], cases['val'])
    with open(split_file) as fh:
        fold = json.load(fh)[0]
    with open(split_file, 'w') as fh:  # identical folds, so tests can train into separate output folders
        json.dump([fold] * 5, fh)
    plan_and_preprocess(PHANTOM_ID, ['2d', '3d_fullres'], num_processes=1, progress=False)
    write_cpu_plans(os.path.join(pre, PHANTOM_NAME), name=TINY_PLANS, features=(4, 8, 16, 32), batch_size_2d=4,
                    batch_size_3d=2)
    return {'raw': folder, 'preprocessed': os.path.join(pre, PHANTOM_NAME), 'name': PHANTOM_NAME,
            'id': PHANTOM_ID, 'cases': cases, 'plans': TINY_PLANS}


def make_trainer(phantom, trainer_name, configuration='2d', epochs=1, iterations=2, val_iterations=1, fold=0,
                 continue_training=False):
    """A trainer built exactly as nnUNetv2_train builds it, with a tiny schedule (attributes, like nnU-Net's
    variants)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_semiseg.discovery import find_trainer

    plans = load_json(os.path.join(phantom['preprocessed'], phantom['plans'] + '.json'))
    plans['continue_training'] = continue_training
    cls = find_trainer(trainer_name)
    trainer = cls(plans, configuration, fold, load_json(os.path.join(phantom['preprocessed'], 'dataset.json')),
                  torch.device('cpu'))
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    return trainer


def trainer_state(trainer):
    """Everything a semi-supervised training step may change, as tensor copies: student, teacher, loss modules'
    buffers and parameters, optimizer state."""
    import torch
    state = {f'network.{k}': v for k, v in trainer.student_network().state_dict().items()}
    state.update({f'teacher.{k}': v for k, v in trainer.teacher.state_dict().items()})
    state.update({f'modules.{k}': v for k, v in trainer.semiseg_modules.state_dict().items()})
    for i, group in trainer.optimizer.state_dict()['state'].items():
        state.update({f'optimizer.{i}.{k}': torch.as_tensor(v) for k, v in group.items() if v is not None})
    return {k: v.detach().clone() for k, v in state.items()}


def training_snapshot(trainer):
    """Deep copies of what a training step reads and changes (student, teacher, modules, optimizer, step counter),
    for :func:`load_training_snapshot`: the same step run two ways from one start."""
    import copy
    return copy.deepcopy({'network': trainer.network.state_dict(), 'teacher': trainer.teacher.state_dict(),
                          'modules': trainer.semiseg_modules.state_dict(),
                          'optimizer': trainer.optimizer.state_dict(), 'step': trainer.semiseg_step})


def load_training_snapshot(trainer, snapshot):
    trainer.network.load_state_dict(snapshot['network'])
    trainer.teacher.load_state_dict(snapshot['teacher'])
    trainer.semiseg_modules.load_state_dict(snapshot['modules'])
    trainer.optimizer.load_state_dict(snapshot['optimizer'])
    trainer.semiseg_step = snapshot['step']


def steps_each_way(trainer, batch, setups, seeds=(0, 1)):
    """Two training steps (torch seeded with ``seeds``) from one start under each ``(attribute, value)`` of
    ``setups``: the logged outputs, the state after them, the row counts of the student's forward calls, and the
    state at the start."""
    import torch
    start, before = training_snapshot(trainer), trainer_state(trainer)
    calls = []
    network_forward = trainer.network.forward
    trainer.network.forward = lambda x: calls.append(x.shape[0]) or network_forward(x)
    runs = []
    for attribute, value in setups:
        load_training_snapshot(trainer, start)
        setattr(trainer, attribute, value)
        calls.clear()
        outs = []
        for seed in seeds:          # the second step reads the first one's momentum and banks
            torch.manual_seed(seed)
            outs.append(trainer.train_step(batch))
        runs.append((outs, trainer_state(trainer), list(calls), before))
    return runs


SAME_STEP_TOLERANCE = 2e-2      # of a group's change in two steps; see assert_same_steps


def step_differences(run_a, run_b):
    """Per group of :func:`trainer_state` (student, teacher, loss modules, momentum buffers): how far apart the two
    runs' states are, as a fraction of how far run a moved that group in its two steps (L2 over the group's tensors
    together; a momentum buffer starts at 0). A 1e-6 RMS floor stands for a group that did not move."""
    import torch
    (_, state_a, _, before), (_, state_b, _, _) = run_a, run_b
    differences = {}
    for group in dict.fromkeys(k.split('.')[0] for k in state_a):          # trainer_state's prefixes, in order
        keys = [k for k in state_a if k.split('.')[0] == group and state_a[k].is_floating_point()]
        if not keys:
            continue
        a, b = (torch.cat([s[k].float().flatten() for k in keys]) for s in (state_a, state_b))
        start = torch.cat([before[k].float().flatten() if k in before else torch.zeros(state_a[k].numel())
                           for k in keys])
        moved = float((a - start).norm()) + 1e-6 * a.numel() ** 0.5
        differences[group] = float((b - a).norm()) / moved
    return differences


def assert_same_steps(run_a, run_b):
    """Two runs of :func:`steps_each_way` give the same step: every logged value that is not NaN, to float tolerance,
    and every group of :func:`trainer_state` within ``SAME_STEP_TOLERANCE`` of its two steps' change. Returns the
    logged keys compared."""
    import pytest
    import torch
    (outs_a, state_a, _, _), (outs_b, state_b, _, _) = run_a, run_b
    terms = [k for k in outs_a[0] if k != 'nonfinite_skipped' and not torch.isnan(torch.tensor(float(outs_a[0][k])))]
    assert 'supervised' in terms and len(terms) >= 3, terms                    # supervised, loss, and a term
    for a, b in zip(outs_a, outs_b):
        assert not a['nonfinite_skipped'] and not b['nonfinite_skipped']
        for key in terms:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key
    assert state_a.keys() == state_b.keys()
    for key, one in state_a.items():       # counters and bank pointers: exact
        if not one.is_floating_point():
            assert torch.equal(one, state_b[key]), key
    # Not per entry: the student's rounding differs between the two ways, and a sample chosen on the student's
    # features that flips on it moves single gradients by 1e-3 of their tensor's largest entry (CI, 2026-12-07: 1.7e-4
    # on a first conv's momentum of largest entry 0.2, against 1e-4 of it). Over a whole group the two ways were 4e-6
    # of the steps' change apart or less on an Intel Xeon; two steps that differ by a draw (other seeds) are 0.2-1.0
    # of it apart, ten times the tolerance or more (test_pass_rows.py checks that margin).
    for group, difference in step_differences(run_a, run_b).items():
        assert difference <= SAME_STEP_TOLERANCE, (group, difference)
    return terms
