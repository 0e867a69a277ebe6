"""Network passes over at most ``rows_per_pass`` rows (the CPU default: the plans' batch size): the same step as one
forward over all rows, for every kind of step (Mean Teacher; relational pre-training; MONA/ARCO's fine-tuning with
its second pass; ACTION++'s fine-tuning), and no split where rows are not independent. Mean Teacher's unlabelled
rows in a second pass: the same step too."""
import itertools

import pytest
import torch

from conftest import SAME_STEP_TOLERANCE, assert_same_steps, load_training_snapshot, make_trainer, step_differences, \
    steps_each_way, training_snapshot
from nnunet_semiseg.training.base import stop_loaders


def _trainer_at(phantom, name, phase):
    trainer = make_trainer(phantom, name, '2d', epochs=3, iterations=2)
    if name != 'nnUNetTrainerMeanTeacher':
        trainer.num_queries, trainer.num_negatives, trainer.negative_bank_size = 32, 64, 500
        trainer.unsup_gate_threshold = None      # pseudo-labels from the first fine-tuning step: every term runs
        trainer.unsup_threshold = 0.1            # every teacher pixel counted (see test_second_pass)
    trainer.on_train_start()
    if phase == 'finetune':
        trainer.semiseg_step = trainer.pretrain_iterations
    # the teacher stays the initial student: its pseudo-labels, samples and bank pushes are the same both ways, so
    # only the student's rounding differs (test_second_pass explains why an EMA teacher would let samples flip)
    trainer.teacher.update = lambda student: None
    batch, unlabeled = next(trainer.dataloader_train), next(trainer.dataloader_unlabeled)
    stop_loaders(trainer)
    trainer.dataloader_unlabeled = itertools.repeat(unlabeled)
    return trainer, batch


def _replay_teacher(trainer):
    """The teacher's outputs of the one-pass steps replayed in the split ones. Its pass is split too and rounds
    differently (``test_forward_in_passes_concatenates_outputs_and_tapped_features`` checks it to 1e-5), and a
    pseudo-label at an argmax near-tie or a confidence at a threshold that flips on that rounding moves every
    sample drawn after it: the step would differ by a draw, not by rounding (seen once in ACTION++'s fine-tuning).
    Replayed, only the student's split is compared, which is what this test is for."""
    forward, recorded, replay = trainer.teacher_forward, [], itertools.count()

    def teacher_forward(x):
        if trainer.rows_per_pass is None:
            recorded.append((x.clone(), forward(x)))
            return recorded[-1][1]
        x_one, out = recorded[next(replay)]
        assert torch.equal(x, x_one)            # the same input both ways: a replay, not a substitute
        return out
    trainer.teacher_forward = teacher_forward


@pytest.mark.parametrize('name, phase', [('nnUNetTrainerMeanTeacher', 'all'),
                                         ('nnUNetTrainerARCO_SAG', 'pretrain'),
                                         ('nnUNetTrainerARCO_SAG', 'finetune'),
                                         ('nnUNetTrainerMONA', 'finetune'),
                                         ('nnUNetTrainerACTIONpp', 'finetune')])
def test_passes_of_fewer_rows_give_the_one_pass_step(phantom, name, phase):
    trainer, batch = _trainer_at(phantom, name, phase)
    assert trainer.batch_size == 4 and trainer.pass_rows() == 4          # 'auto' on the CPU: the plans' batch size
    if name == 'nnUNetTrainerMeanTeacher':
        trainer.unlabeled_second_pass = False    # all 8 rows in the first forward, the rows to split
    if name == 'nnUNetTrainerACTIONpp':
        # every pixel a hard query: the student's own probability, not the teacher's, picks them (< 0.97)
        trainer.semiseg_modules['anatomical_contrast'].strong_threshold = 1.0
    _replay_teacher(trainer)
    # 3: uneven passes (8 rows as 3 + 3 + 2), every row boundary inside a part
    one, split = steps_each_way(trainer, batch, [('rows_per_pass', None), ('rows_per_pass', 3)])
    assert max(one[2]) == 8 and max(split[2]) == 3 and sum(split[2]) == sum(one[2])
    assert_same_steps(one, split)


def test_a_step_of_another_draw_is_ten_tolerances_away(phantom):
    # what the comparison of two ways must tell apart: the same fine-tuning step under other seeds (other strong
    # views, samples and negatives) moves every group that the draw reaches by ten times the tolerance or more
    trainer, batch = _trainer_at(phantom, 'nnUNetTrainerMONA', 'finetune')
    start = training_snapshot(trainer)
    one, = steps_each_way(trainer, batch, [('rows_per_pass', None)])
    load_training_snapshot(trainer, start)
    other, = steps_each_way(trainer, batch, [('rows_per_pass', None)], seeds=(10, 11))
    differences = step_differences(one, other)
    assert differences['teacher'] == 0                                       # frozen: the same both ways
    for group in ('network', 'modules', 'optimizer'):
        assert differences[group] > 10 * SAME_STEP_TOLERANCE, differences


def test_mean_teachers_unlabelled_second_pass_gives_the_one_forward_step(phantom):
    trainer, batch = _trainer_at(phantom, 'nnUNetTrainerMeanTeacher', 'all')
    trainer.rows_per_pass = None
    one, two = steps_each_way(trainer, batch, [('unlabeled_second_pass', False),
                                                    ('unlabeled_second_pass', True)])
    assert one[2] == [8, 8] and two[2] == [4, 4, 4, 4]     # per step: one forward of 8 rows, or 4 then 4
    assert_same_steps(one, two)
    assert float(two[0][0]['consistency']) > 0


def test_pass_rows_follows_the_device_and_keeps_coupled_rows_together(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d')
    trainer.initialize()
    assert trainer.pass_rows() == trainer.batch_size == 4
    trainer.device = torch.device('cuda')        # read only by pass_rows here: no CUDA needed
    assert trainer.pass_rows() is None           # a GPU runs all rows in one pass
    trainer.rows_per_pass = 2
    assert trainer.pass_rows() == 2
    trainer._batch_statistics = True             # BatchNorm couples the rows of a forward: never split
    assert trainer.pass_rows() is None
    trainer._batch_statistics = None
    for bad in (0, -1, 2.5, 'half'):
        trainer.rows_per_pass = bad
        with pytest.raises(ValueError, match='rows_per_pass'):
            trainer.pass_rows()


def test_forward_in_passes_concatenates_outputs_and_tapped_features(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerARCO_SAG', '2d')
    trainer.initialize()
    net = trainer.network
    x = torch.randn((7, 1) + tuple(trainer.configuration_manager.patch_size))
    with torch.no_grad():
        trainer.rows_per_pass = None
        trainer._features.clear()
        whole = trainer.forward_in_passes(net, x, 'student')
        feats_whole = trainer.student_features()
        trainer.rows_per_pass = 2
        trainer._features.clear()
        parts = trainer.forward_in_passes(net, x, 'student')
        feats_parts = trainer.student_features()
    assert isinstance(whole, (list, tuple)) and len(parts) == len(whole)      # every deep-supervision level
    for a, b in zip(whole, parts):
        assert b.shape == a.shape and torch.allclose(a, b, atol=1e-5)
    assert feats_parts.keys() == feats_whole.keys() and feats_whole
    for k in feats_whole:
        assert feats_parts[k].shape[0] == 7 and torch.allclose(feats_whole[k], feats_parts[k], atol=1e-5), k
