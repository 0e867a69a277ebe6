"""The pseudo-label loss gate (nnunet_semiseg.gate, ``unsup_gate_threshold``): Dice per class on hand-built batches,
its moving average, when it opens, and in a trainer: no pseudo-label loss while it is closed, open at the deadline,
checkpointed; off by default."""
import pytest
import torch

from conftest import make_trainer
from nnunet_semiseg.gate import ClassDiceGate


def one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``labels [B, *sp]``: ``[B, C, *sp]``."""
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float()


def test_dice_per_class_on_a_hand_built_batch():
    # 2 rows of 1 x 4 pixels, 3 classes
    target = torch.tensor([[[1, 1, 2, 0]], [[1, 0, 2, 2]]])
    pred = torch.tensor([[[1, 0, 2, 0]], [[1, 1, 0, 2]]])
    gate = ClassDiceGate(3, threshold=0.9)
    assert not gate.update(one_hot_logits(pred, 3), target)
    # class 1: tp 2, |pred| 3, |true| 3 -> 4/6; class 2: tp 2, |pred| 2, |true| 3 -> 4/5 (first measurement: no average)
    assert gate.dice.tolist() == pytest.approx([4 / 6, 4 / 5])
    assert gate.seen.tolist() == [True, True]


def test_opens_once_every_class_reaches_the_threshold_and_stays_open():
    target = torch.tensor([[[1, 1, 2, 2]]])
    miss2 = one_hot_logits(torch.tensor([[[1, 1, 0, 0]]]), 3)   # class 1 right, class 2 missed
    perfect = one_hot_logits(target, 3)
    gate = ClassDiceGate(3, threshold=0.6, momentum=0.5)
    assert not gate.update(miss2, target)
    assert gate.dice.tolist() == pytest.approx([1.0, 0.0])
    assert not gate.update(perfect, target)          # class 2: 0.5 * 0 + 0.5 * 1 = 0.5 < 0.6
    assert gate.dice.tolist() == pytest.approx([1.0, 0.5])
    assert gate.update(perfect, target)              # 0.75 >= 0.6: open
    assert gate.update(miss2, target)                # a bad batch later does not close it
    assert gate.dice.tolist() == pytest.approx([1.0, 0.75])   # nor is it measured any more
    assert gate.averages() == '1.00, 0.75'                     # as the training log shows them
    at_threshold = ClassDiceGate(3, threshold=0.5, momentum=0.5)
    at_threshold.update(miss2, target)
    assert at_threshold.update(perfect, target)      # 0.5 >= 0.5


def test_a_class_absent_from_the_batch_keeps_its_average_and_an_unseen_class_keeps_it_closed():
    gate = ClassDiceGate(3, threshold=0.6, momentum=0.5)
    only1 = torch.tensor([[[1, 1, 0, 0]]])
    assert not gate.update(one_hot_logits(only1, 3), only1)   # class 2 never seen: closed although class 1 is 1.0
    assert gate.seen.tolist() == [True, False] and gate.dice.tolist() == pytest.approx([1.0, 0.0])
    both = torch.tensor([[[1, 0, 2, 0]]])
    pred = torch.tensor([[[0, 0, 2, 0]]])                     # class 1 missed, class 2 right
    assert not gate.update(one_hot_logits(pred, 3), both)
    assert gate.dice.tolist() == pytest.approx([0.5, 1.0])    # 0.5 * 1.0 + 0.5 * 0.0; class 2 first measured


def test_ignored_pixels_count_for_nothing():
    target = torch.tensor([[[1, -1, -1, 0]]])
    pred = torch.tensor([[[1, 1, 1, 0]]])                     # the two extra class-1 pixels are ignored ones
    gate = ClassDiceGate(2, threshold=1.0)
    assert gate.update(one_hot_logits(pred, 2), target)
    assert gate.dice.tolist() == pytest.approx([1.0])


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClassDiceGate(1)
    with pytest.raises(ValueError):
        ClassDiceGate(3, threshold=0.0)
    with pytest.raises(ValueError, match='logits'):
        ClassDiceGate(3).update(torch.zeros(1, 2, 4), torch.zeros(1, 4, dtype=torch.long))


def test_trainer_gates_by_default_and_none_is_the_papers_schedule(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerACTIONpp', '2d')
    trainer.initialize()
    assert (trainer.unsup_gate_threshold, trainer.unsup_gate_deadline) == (0.5, 1.0)
    assert trainer.semiseg_modules['unsup_gate'].threshold == 0.5 and not trainer.unsup_gate_open()
    papers = make_trainer(phantom, 'nnUNetTrainerMONA', '2d')
    papers.unsup_gate_threshold = None
    papers.initialize()
    assert 'unsup_gate' not in papers.semiseg_modules and papers.unsup_gate_open()


def test_trainer_holds_the_pseudo_label_loss_until_the_deadline(phantom):
    """A gate that cannot open on its own (threshold 1 on a barely trained teacher): the pseudo-label loss weighs 0
    for the first half of fine-tuning, the teacher reads the labelled rows meanwhile (ACTION's fine-tuning otherwise
    runs it on the unlabelled rows only), then the gate opens, says so in the log, and is checkpointed open."""
    trainer = make_trainer(phantom, 'nnUNetTrainerACTION', '2d', epochs=1, iterations=5, fold=2)
    trainer.pretrain_fraction = 0.2          # 1 pre-training step, 4 fine-tuning steps, deadline after 2
    trainer.num_queries, trainer.num_negatives = 64, 128
    trainer.unsup_gate_threshold, trainer.unsup_gate_deadline = 1.0, 0.5
    weights, teacher_rows = [], []
    original_weight, original_terms = trainer.current_lambda_unsup, trainer.compute_semisupervised_terms

    def record_weight():
        weights.append(original_weight())
        return weights[-1]

    def record_terms(batch):
        teacher_rows.append(trainer._cache['t_labeled_rows'])
        return original_terms(batch)

    trainer.current_lambda_unsup, trainer.compute_semisupervised_terms = record_weight, record_terms
    trainer.run_training()
    assert weights == [0.0, 0.0, 1.0, 1.0]
    n = trainer.batch_size
    # pre-training, three fine-tuning steps that start closed (the gate opens after the step's teacher forward), then
    # the weak unlabelled view only
    assert teacher_rows == [n, n, n, n, 0]
    state = trainer.semiseg_state_dict()['modules']
    assert bool(state['unsup_gate.is_open']) and not bool((state['unsup_gate.dice'] >= 1.0).all())
    with open(trainer.log_file) as fh:
        assert 'pseudo-label loss gate open at iteration 3: unsup_gate_deadline, 0.5 of fine-tuning, passed' in fh.read()


def test_trainer_warns_when_the_gate_never_opens(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerACTION', '2d', epochs=1, iterations=3, fold=3)
    trainer.pretrain_fraction = 1 / 3
    trainer.num_queries, trainer.num_negatives = 64, 128
    trainer.unsup_gate_threshold, trainer.unsup_gate_deadline = 1.0, 1.0
    trainer.run_training()
    assert not trainer.unsup_gate_open()
    with open(trainer.log_file) as fh:
        log = fh.read()
    assert 'gate open' not in log
    assert 'pseudo-label loss gate closed: teacher Dice per foreground class on the labelled rows, moving average: ' in log
    assert 'WARNING: the pseudo-label loss gate never opened' in log and 'trained without the pseudo-label loss' in log
