"""The non-finite step guard of the base trainer: a step whose loss or a term is NaN/inf is skipped (network,
optimizer, EMA teacher and centroids unchanged; the feature banks keep the finite teacher features the step pushed,
or are put back too with ``restore_banks_on_skip``), counted and logged with the failing term; ten in a row stop
training with the term and the cases named; under DDP every rank skips when any rank failed."""
import copy
import os

import numpy as np
import pytest
import torch

from nnunet_semiseg.training.base import NonFiniteLossError, nnUNetTrainerSemiSupervised

from conftest import make_trainer, trainer_state as _state


def _poison(trainer, term, steps):
    """Make ``term`` NaN (graph kept) on the given ``semiseg_step`` values (``steps=None``: every step). The
    method's own code still runs first, so its banks and queues are pushed as in a real bad step."""
    if term == 'supervised':
        loss = trainer.loss

        def poisoned_loss(output, target):
            value = loss(output, target)
            return value * float('nan') if steps is None or trainer.semiseg_step in steps else value
        trainer.loss = poisoned_loss
        return

    def poisoning(method):
        def poisoned(*args):
            terms = method(*args)
            if term in terms and (steps is None or trainer.semiseg_step in steps):
                weight, value = terms[term]
                terms[term] = (weight, value * float('nan'))
            return terms
        return poisoned
    # a term comes from the first pass or from a second pass of its own (Mean Teacher's unlabelled rows)
    trainer.compute_semisupervised_terms = poisoning(trainer.compute_semisupervised_terms)
    trainer.second_pass_terms = poisoning(trainer.second_pass_terms)


def _changed(before, after):
    return sorted(k for k in after if k not in before or not torch.equal(before[k], after[k]))


@pytest.mark.parametrize('with_grad_scaler', [False, True])
def test_one_nan_step_is_skipped_and_training_goes_on(phantom, with_grad_scaler):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=1, iterations=3, fold=0)
    trainer.initialize()
    if with_grad_scaler:  # nnU-Net's AMP path (GradScaler.scale/unscale_/step/update); a CPU scaler runs it here
        trainer.grad_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    _poison(trainer, 'consistency', steps={1})
    states, original_step = [], trainer.train_step

    def recorded_step(batch):
        before = _state(trainer)
        out = original_step(batch)
        states.append((before, _state(trainer)))
        return out
    trainer.train_step = recorded_step
    trainer.run_training()

    assert len(states) == 3 and trainer.semiseg_step == 3
    assert _changed(*states[1]) == []                               # the NaN step changed nothing at all
    for before, after in (states[0], states[2]):                   # the others trained student and teacher
        changed = _changed(before, after)
        assert any(k.startswith('network.') for k in changed) and any(k.startswith('teacher.') for k in changed)
    assert trainer.teacher.num_updates == 1 + 2                    # initial copy + the two finite steps
    if with_grad_scaler:
        assert trainer.grad_scaler.get_scale() == 2.0 ** 10      # no inf gradients: the scaler never backed off
    log = trainer.logger.local_logger.my_fantastic_logging
    assert log['nonfinite_steps_skipped'] == [1]
    assert np.isfinite(log['train_losses'][0]) and np.isfinite(log['train_consistency'][0])
    with open(trainer.log_file) as fh:
        text = fh.read()
    assert 'non-finite consistency loss at step 1 (epoch 0; labelled cases [' in text
    assert 'step skipped, no optimizer or teacher update (1 in a row, 1 in this run)' in text
    assert 'non-finite steps skipped this epoch: 1 (1 in this run)' in text
    ckpt = torch.load(os.path.join(trainer.output_folder, 'checkpoint_final.pth'), weights_only=False)
    assert ckpt['semiseg_state']['nonfinite_steps_skipped'] == 1
    assert ckpt['logging']['nonfinite_steps_skipped'] == [1]


BANKS = {'nnUNetTrainerACTIONpp': [('modules.global_kl.bank.', 'modules.local_kl.bank.'),
                                   ('modules.supervised_contrast.queue.',)],
         'nnUNetTrainerMONA': [('modules.global_kl.bank.', 'modules.local_kl.bank.'),
                               ('modules.pixel_contrast.banks.', 'modules.nearest_neighbour.bank.')]}


@pytest.mark.parametrize('restore_banks', [False, True])
@pytest.mark.parametrize('name, pretrain_term, finetune_term', [
    ('nnUNetTrainerACTIONpp', 'global_distillation', 'supervised_contrast'),
    ('nnUNetTrainerMONA', 'local_distillation', 'contrast'),
])
def test_skipped_step_leaves_teacher_weights_and_centroids_unchanged(phantom, name, pretrain_term, finetune_term,
                                                                     restore_banks):
    """Steps 0-1 pre-train (distillation banks), 2-3 fine-tune (ASCL queue and centroids / MONA's pixel-contrast
    and nearest-neighbour banks); steps 1 and 3 are poisoned after the method pushed into its banks. A skipped step
    changes nothing but the banks it pushed to (finite teacher features), and not those with
    ``restore_banks_on_skip``."""
    trainer = make_trainer(phantom, name, '2d', epochs=1, iterations=4, fold=1)
    trainer.restore_banks_on_skip = restore_banks
    trainer.pretrain_fraction = 0.5
    trainer.num_queries, trainer.num_negatives = 32, 64
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    _poison(trainer, pretrain_term, steps={1})
    _poison(trainer, finetune_term, steps={3})
    diffs = []
    for _ in range(4):
        before = _state(trainer)
        out = trainer.train_step(next(trainer.dataloader_train))
        diffs.append((out, _changed(before, _state(trainer))))
    for step, banks in zip((1, 3), BANKS[name]):
        out, changed = diffs[step]
        assert out['nonfinite_skipped'], step
        if restore_banks:
            assert changed == [], (step, changed)
        else:
            assert changed and all(k.startswith(banks) for k in changed), (step, changed)
            state = _state(trainer)
            assert all(torch.isfinite(state[k]).all() for k in changed if k.endswith('.feats'))
    pushed = {'nnUNetTrainerACTIONpp': [('modules.global_kl.bank.',), ('modules.supervised_contrast.queue.',
                                                                      'modules.supervised_contrast.centroids')],
              'nnUNetTrainerMONA': [('modules.local_kl.bank.',),
                                    ('modules.pixel_contrast.banks.', 'modules.nearest_neighbour.bank.')]}[name]
    for step, prefixes in zip((0, 2), pushed):                    # the test is sensitive: finite steps do push
        out, changed = diffs[step]
        assert not out['nonfinite_skipped'] and any(k.startswith('teacher.') for k in changed)
        for prefix in prefixes:
            assert any(k.startswith(prefix) for k in changed), (step, prefix)
    assert trainer.nonfinite_steps_skipped == 2 and trainer.semiseg_step == 4


@pytest.mark.parametrize('term', ['consistency', 'supervised'])
def test_nan_on_every_step_stops_after_ten_naming_term_and_cases(phantom, term):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=1, iterations=12, fold=2)
    trainer.initialize()
    _poison(trainer, term, steps=None)
    keys, original_step = [], trainer.train_step

    def recorded_step(batch):
        keys.append(list(batch['keys']))
        return original_step(batch)
    trainer.train_step = recorded_step
    initial = None
    with pytest.raises(NonFiniteLossError) as err:
        trainer.on_train_start()
        initial = _state(trainer)
        trainer.on_train_epoch_start()
        for _ in range(trainer.num_iterations_per_epoch):
            trainer.train_step(next(trainer.dataloader_train))
    message = str(err.value)
    assert len(keys) == 10 and trainer.nonfinite_steps_skipped == 10
    assert message.startswith(f'10 consecutive training steps had a non-finite {term} loss (last: step 9, epoch 0; '
                              f'labelled cases {keys[-1]}, unlabelled cases [')
    assert any(case in message for case in phantom['cases']['unlabeled'])
    assert 'continue from checkpoint_latest.pth with --c' in message
    assert _changed(initial, _state(trainer)) == [] and trainer.teacher.num_updates == 1


def _ddp_worker(rank, world_size, init_file, results):
    import torch.distributed as dist
    from types import SimpleNamespace
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        me = SimpleNamespace(device=torch.device('cpu'), is_ddp=True)
        finite = torch.tensor(1.0)
        # rank 1 alone has an infinite 'contrast' term; every rank must decide to skip, naming that term
        contrast = torch.tensor(float('inf')) if rank == 1 else torch.tensor(0.5)
        failed = nnUNetTrainerSemiSupervised._nonfinite_terms(me, finite, {'contrast': (0.01, contrast)},
                                                              finite + 0.01 * contrast)
        clean = nnUNetTrainerSemiSupervised._nonfinite_terms(me, finite, {'contrast': (0.01, finite)}, 2 * finite)
        results[rank] = (failed, clean)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_to_skip_when_one_rank_is_not_finite(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'rendezvous'), results), nprocs=2, join=True)
    assert dict(results) == {0: (['contrast'], []), 1: (['contrast'], [])}


def test_overflow_of_the_weighted_sum_alone_is_named_total():
    from types import SimpleNamespace
    me = SimpleNamespace(device=torch.device('cpu'), is_ddp=False)
    big = torch.tensor(3e38)
    assert nnUNetTrainerSemiSupervised._nonfinite_terms(me, big, {'a': (1.0, big)}, big + big) == ['total']
    assert nnUNetTrainerSemiSupervised._nonfinite_terms(
        me, torch.tensor(float('nan')), {'a': (1.0, torch.tensor(float('-inf')))}, big) == ['supervised', 'a']
