"""The cheaper fine-tuning computations give the values and gradients of the dense ones they replaced
(``reference_dense.py``: the code of commit f9defcf) on fixed inputs and seeds.

* the FPN head as one linear map per level (:meth:`FPNProjectionHead.forward`) and read only where the losses read
  it (:class:`RepresentationMap`) equals the layer-by-layer head; checked in float64, where the only difference is
  the order of the sums (tolerance 1e-10), in 2D and 3D, with finer levels that are and are not block multiples;
* PixelContrastLoss (bank and paper negatives, naive and stratified-antithetic sampling) and
  AnatomicalContrastLoss read through a RepresentationMap equal the dense reference, bank contents included
  (float64 inputs; the losses take their logits in float32 by design, so values and gradients agree to float32
  rounding, 1e-5 relative);
* ACTION++'s adaptive supervised contrast without the ``[N, M]`` log-probabilities (queue positives as per-class
  sums, the queue's log-partition as one product each way) equals its written form (``reference_dense.py``: the code
  of commit 2cc958f) in values, student gradients and buffers, from an empty queue through a wrapped one and at the
  ACDC 2d size (1024 pixels against a full 12 288 queue, tau = 0.1); float32 in both, so 1e-5 relative;
* AnCo's negative draw with the candidates grouped once for all classes, and ACTION++'s pixel draw, give the
  indices of the reference draws exactly;
* one fine-tuning step of every contrastive trainer (MONA with and without the equivariance rows, ARCO-SAG,
  ACTION, ACTION++; the equivariance rows in their own second pass, the reference's in one forward with the rest)
  gives the reference's terms and gradients of every trainable parameter, in float32 (tolerance
  1e-4 relative to the largest entry: float32 sums in another order, ~1e-6, with a margin for the occasional
  negative whose class draw sits within rounding of a boundary of the multinomial).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_dense
from conftest import make_trainer
from nnunet_semiseg.contrast.anatomical import AnatomicalContrastLoss, group_by_class, sample_negatives
from nnunet_semiseg.contrast.ascl import (AdaptiveSupervisedContrastLoss, _LogSumExpOfProducts,
                                          sample_pixels_per_class)
from nnunet_semiseg.contrast.pixel_contrast import PixelContrastLoss
from nnunet_semiseg.heads import FPNProjectionHead, Predictor
from nnunet_semiseg.training.base import SemiSegBatch, stop_loaders

TIGHT = 1e-10   # float64: same sums, other order
FLOAT32 = 1e-5  # the losses take their logits in float32: relative to the largest entry


def _features(channels, sizes, batch=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *s, generator=g, dtype=dtype).requires_grad_(True) for c, s in zip(channels, sizes)]


def _head(conv, channels, dim, level, seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    return FPNProjectionHead(conv, channels, dim, output_level=level).to(dtype), Predictor(conv, dim).to(dtype)


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=True)


def _diff(a, b):
    return float((a - b).detach().abs().max())


def _max_diff(a, b):
    return max(_diff(x, y) for x, y in zip(a, b) if x is not None or y is not None)


def _max_rel_diff(a, b):
    """Largest difference of each pair of gradients relative to the pair's largest entry."""
    return max(_diff(x, y) / (float(y.detach().abs().max()) + 1e-30) for x, y in zip(a, b) if y is not None)


HEAD_CASES = [  # conv, channels (coarse -> fine), sizes, D, output level
    (nn.Conv2d, [32, 16, 8, 4], [(4, 5), (8, 10), (16, 20), (32, 40)], 12, -2),      # nnU-Net 2d: 1/2 resolution
    (nn.Conv2d, [32, 16, 8, 4], [(4, 5), (7, 10), (15, 20), (31, 40)], 12, -2),      # odd sizes: area not a block
    (nn.Conv2d, [32, 16, 8, 4], [(4, 5), (8, 10), (16, 20), (32, 40)], 12, 0),       # output at the coarsest
    (nn.Conv2d, [32, 16, 8, 4], [(4, 5), (8, 10), (16, 20), (32, 40)], 12, -1),      # the papers' full resolution
    (nn.Conv3d, [32, 16, 8, 4], [(2, 4, 4), (4, 8, 8), (8, 16, 16), (8, 32, 32)], 6, -3),   # 3d: 1/4, anisotropic
    (nn.Conv3d, [32, 16, 8, 4], [(3, 4, 4), (5, 8, 8), (9, 16, 16), (9, 32, 32)], 6, -2),
]


@pytest.mark.parametrize('conv, channels, sizes, dim, level', HEAD_CASES)
def test_head_per_level_equals_layer_by_layer(conv, channels, sizes, dim, level):
    feats = _features(channels, sizes)
    head, predictor = _head(conv, channels, dim, level)
    params = feats + list(head.parameters()) + list(predictor.parameters())
    reference = predictor(head.forward_layered(feats))
    fused = head(feats, predictor)
    assert fused.shape == reference.shape
    assert _diff(fused, reference) < TIGHT
    weight = torch.randn(reference.shape, dtype=reference.dtype, generator=torch.Generator().manual_seed(2))
    assert _max_diff(_grads((fused * weight).sum(), params), _grads((reference * weight).sum(), params)) < TIGHT
    assert _diff(head(feats), head.forward_layered(feats)) < TIGHT    # without the predictor


@pytest.mark.parametrize('conv, channels, sizes, dim, level', HEAD_CASES)
def test_representation_map_reads_equal_the_dense_map(conv, channels, sizes, dim, level):
    """Values and gradients of reads at positions and of spatial means, as the losses take them."""
    feats = _features(channels, sizes)
    head, predictor = _head(conv, channels, dim, level)
    params = feats + list(head.parameters()) + list(predictor.parameters())
    dense = predictor(head.forward_layered(feats))
    b, d, n_pos = dense.shape[0], dense.shape[1], dense[0, 0].numel()
    flat = torch.randint(b * n_pos, (300,), generator=torch.Generator().manual_seed(3))
    reps = head.represent(feats, predictor)
    assert reps.shape == dense.shape and reps.spatial_size == tuple(dense.shape[2:])
    at_reference = dense.reshape(b, d, -1)[flat // n_pos, :, flat % n_pos]
    at = reps.at(flat)
    assert _diff(at, at_reference) < TIGHT
    mean_reference = dense.flatten(2).mean(-1)
    assert _diff(reps.spatial_mean(), mean_reference) < TIGHT
    assert _diff(reps.detached(), dense) < TIGHT and not reps.detached().requires_grad
    value, value_reference = at.square().sum() + reps.spatial_mean().sum(), \
        at_reference.square().sum() + mean_reference.sum()
    assert _max_diff(_grads(value, params), _grads(value_reference, params)) < TIGHT
    zero = reps.zero()
    assert zero.item() == 0.0 and all(g is not None for g in _grads(zero, params))  # the graph reaches everything


def test_nonlinear_head_reads_the_dense_map():
    channels, sizes = [16, 8, 4], [(4, 4), (8, 8), (16, 16)]
    feats = _features(channels, sizes)
    head = FPNProjectionHead(nn.Conv2d, channels, 6, output_level=-2, nonlinear=True).double()
    dense = head.forward_layered(feats)
    reps = head.represent(feats)
    assert not reps.linear and torch.equal(head(feats), dense)
    flat = torch.arange(0, dense.shape[0] * 64, 7)
    assert torch.allclose(reps.at(flat), dense.reshape(3, 6, -1)[flat // 64, :, flat % 64], atol=TIGHT)
    assert torch.allclose(reps.spatial_mean(), dense.flatten(2).mean(-1), atol=TIGHT)


# ------------------------------------------------------------------------------------------------ losses
def _contrast_inputs(seed, batch=4, size=(16, 20), classes=4, dim=8):
    """Decoder-like features for a 2D head at 1/2 resolution, full-resolution labels / teacher probs / masks."""
    g = torch.Generator().manual_seed(seed)
    full = (2 * size[0], 2 * size[1])
    channels, sizes = [16, 8, 4], [(size[0] // 2, size[1] // 2), size, full]
    feats = [torch.randn(batch, c, *s, generator=g, dtype=torch.float64).requires_grad_(True)
             for c, s in zip(channels, sizes)]
    labels = torch.randint(0, classes, (batch, *full), generator=g)
    labels[0, :3] = -1                                                       # an ignored band
    probs = torch.softmax(3 * torch.randn(batch, classes, *full, generator=g, dtype=torch.float64), 1)
    low, high = torch.rand(batch, *full, generator=g) > 0.3, torch.rand(batch, *full, generator=g) > 0.5
    teacher = torch.randn(batch, dim, *size, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    head = FPNProjectionHead(nn.Conv2d, channels, dim, output_level=-2).double()
    predictor = Predictor(nn.Conv2d, dim).double()
    return feats, head, predictor, labels, probs, low, high, teacher


@pytest.mark.parametrize('mode', ['bank', 'paper'])
@pytest.mark.parametrize('sampler', ['naive', 'sag'])
def test_pixel_contrast_equals_dense_reference(mode, sampler):
    feats, head, predictor, labels, probs, low, high, teacher = _contrast_inputs(0)
    is_labeled = torch.tensor([True, True, False, False])
    params = feats + list(head.parameters()) + list(predictor.parameters())
    kwargs = dict(num_queries=16, num_negatives=24, negative_mode=mode, rep_dim=8, bank_size=50, sampler=sampler)
    current = PixelContrastLoss(4, **kwargs).double()
    reference = reference_dense.ReferencePixelContrastLoss(4, **kwargs).double()
    for step in range(2):  # bank mode: the first step fills the banks, the second draws from them
        value = current(head.represent(feats, predictor), teacher, labels, probs, low, high, is_labeled,
                        generator=torch.Generator().manual_seed(10 + step))
        dense = predictor(head.forward_layered(feats))
        value_reference = reference(dense, teacher, labels, probs, low, high, is_labeled,
                                    generator=torch.Generator().manual_seed(10 + step))
        assert value.item() == pytest.approx(value_reference.item(), rel=FLOAT32) and value.item() > 0
        assert _max_rel_diff(_grads(value, params), _grads(value_reference, params)) < FLOAT32
        # the dense input path of the current loss too
        value_dense = current(dense, teacher, labels, probs, low, high, is_labeled,
                              generator=torch.Generator().manual_seed(10 + step))
        assert value_dense.item() == pytest.approx(value_reference.item(), rel=FLOAT32)
    for key, buffer in reference.state_dict().items():
        assert torch.allclose(current.state_dict()[key], buffer, atol=TIGHT), key


@pytest.mark.parametrize('sampler', [None, 'sag'])
def test_anatomical_contrast_equals_dense_reference(sampler):
    from functools import partial
    from nnunet_semiseg.sampling import sample
    feats, head, _, labels, probs, _, _, _ = _contrast_inputs(1)
    size = feats[1].shape[2:]
    labels, probs = F.interpolate(labels[:, None].double(), size=size).long()[:, 0], F.interpolate(probs, size=size)
    valid = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) > 0.2
    params = feats + list(head.parameters())
    query_sampler = None if sampler is None else partial(sample, mode=sampler)
    kwargs = dict(num_queries=16, num_negatives=24, query_sampler=query_sampler)
    value = AnatomicalContrastLoss(**kwargs)(head.represent(feats), labels, probs, valid, tau=0.3,
                                             generator=torch.Generator().manual_seed(5))
    value_reference = reference_dense.ReferenceAnatomicalContrastLoss(**kwargs)(
        head.forward_layered(feats), labels, probs, valid, tau=0.3, generator=torch.Generator().manual_seed(5))
    assert value.item() == pytest.approx(value_reference.item(), rel=FLOAT32) and value.item() > 0
    assert _max_rel_diff(_grads(value, params), _grads(value_reference, params)) < FLOAT32


def test_draws_equal_reference():
    g = torch.Generator().manual_seed(0)
    pixel_class = torch.randint(0, 4, (5000,), generator=g)
    class_probs = torch.tensor([0.0, 0.5, 0.3, 0.2])
    grouped = group_by_class(pixel_class, 4)
    for seed in range(3):
        reference = reference_dense.sample_negatives(pixel_class, class_probs, 16, 24,
                                                     torch.Generator().manual_seed(seed))
        assert torch.equal(sample_negatives(pixel_class, class_probs, 16, 24, torch.Generator().manual_seed(seed),
                                            grouped), reference)
        assert torch.equal(sample_negatives(pixel_class, class_probs, 16, 24, torch.Generator().manual_seed(seed)),
                           reference)
    labels = torch.randint(-1, 4, (3, 20, 24), generator=g)
    valid = torch.rand(3, 20, 24, generator=g) > 0.3
    for kwargs in ({}, {'valid': valid}):
        drawn = sample_pixels_per_class(labels, 4, 32, generator=torch.Generator().manual_seed(1), **kwargs)
        reference = reference_dense.sample_pixels_per_class(labels, 4, 32, generator=torch.Generator().manual_seed(1),
                                                            **kwargs)
        assert drawn.numel() == 4 * 32 and torch.equal(drawn, reference)


def test_log_sum_exp_of_products_gradient():
    """The hand-written backward against finite differences (float64) and the value against torch.logsumexp."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(_LogSumExpOfProducts.apply(a, b), torch.logsumexp(a @ b.T, 1), atol=TIGHT)
    assert torch.autograd.gradcheck(lambda x: _LogSumExpOfProducts.apply(x, b), (a,))


ASCL_CASES = [  # classes, D, pixels per step, queue size, entries in the queue before the first step, tau, lambda
    (4, 8, 24, 50, 0, 0.3, 0.2),             # from an empty queue; it fills and wraps around over the steps
    (3, 16, 40, 100, 0, 1.0, 0.0),           # lambda = 0: the centre still counts in n_i
    (4, 128, 1024, 12288, 12288, 0.1, 0.2),  # ACDC 2d: 256 pixels x 4 classes against a full queue, tau_min
]


@pytest.mark.parametrize('classes, dim, n, queue_size, prefill, tau, lambda_centre', ASCL_CASES)
def test_ascl_equals_reference(classes, dim, n, queue_size, prefill, tau, lambda_centre):
    g = torch.Generator().manual_seed(0)
    current = AdaptiveSupervisedContrastLoss(classes, dim, queue_size, lambda_centre)
    reference = reference_dense.ReferenceAdaptiveSupervisedContrastLoss(classes, dim, queue_size, lambda_centre)
    if prefill:
        feats = F.normalize(torch.randn(prefill, dim, generator=g), dim=1)
        labels = torch.randint(0, classes, (prefill,), generator=g)
        current.queue.push(feats, labels)
        reference.queue.push(feats, labels)
    for step in range(4 if not prefill else 2):
        student = torch.randn(n, dim, generator=g, requires_grad=True)
        teacher, labels = torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)
        value = current(student, teacher, labels, tau=tau)
        value_reference = reference(student, teacher, labels, tau=tau)
        assert value.item() == pytest.approx(value_reference.item(), rel=FLOAT32) and value.item() > 0
        assert _max_rel_diff(_grads(value, [student]), _grads(value_reference, [student])) < FLOAT32
        for key, buffer in reference.state_dict().items():
            assert torch.equal(current.state_dict()[key], buffer), key


# ------------------------------------------------------------------------------------------------ trainers
def _finetune_step(trainer, batch, unlabeled, reference, seed):
    """One fine-tuning step up to the backward (no optimizer step, no EMA): terms and the gradient of every
    trainable parameter."""
    torch.manual_seed(seed)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._features.clear()
    data, target = batch['data'], batch['target']
    weak, strong = unlabeled['data_weak'], unlabeled['data_strong']
    prepare = reference_dense.prepare_student_input if reference else type(trainer).prepare_student_input
    x, rows = prepare(trainer, data, weak, strong)
    output = trainer.network(x)
    n = data.shape[0]
    supervised = trainer.loss([o[:n] for o in output], target)
    step = SemiSegBatch(data, target, output, rows, weak, strong)
    terms = (reference_dense.compute_semisupervised_terms if reference else
             type(trainer).compute_semisupervised_terms)(trainer, step)
    total = supervised + sum(weight * value for weight, value in terms.values())
    total.backward()
    if not reference and trainer.wants_second_pass():     # the equivariance rows' own forward, as train_step runs it
        trainer._features.clear()
        more = trainer.second_pass_terms()
        sum(weight * value for weight, value in more.values()).backward()
        terms.update(more)
    grads = {name: p.grad.detach().clone() for name, p in
             list(trainer.network.named_parameters()) + list(trainer.semiseg_modules.named_parameters())
             if p.grad is not None}
    return {k: float(v.detach()) for k, (_, v) in terms.items()}, grads, rows, x.shape[0]


TRAINER_CASES = [('nnUNetTrainerMONA', {}), ('nnUNetTrainerMONA', {'lambda_equivariance': 0.0}),
                 ('nnUNetTrainerARCO_SAG', {}), ('nnUNetTrainerACTION', {}), ('nnUNetTrainerACTIONpp', {})]


@pytest.mark.parametrize('name, attributes', TRAINER_CASES)
def test_finetune_step_equals_dense_reference(phantom, name, attributes):
    trainer = make_trainer(phantom, name, '2d', epochs=3, iterations=2, fold=0)
    trainer.num_queries, trainer.num_negatives = 32, 64
    trainer.unsup_gate_threshold = None     # the reference's schedule: pseudo-labels from the first fine-tuning step
    for key, value in attributes.items():
        setattr(trainer, key, value)
    trainer.on_train_start()
    trainer.semiseg_step = trainer.pretrain_iterations                       # fine-tuning phase
    batch, unlabeled = next(trainer.dataloader_train), next(trainer.dataloader_unlabeled)
    start_modules = copy.deepcopy(trainer.semiseg_modules.state_dict())
    runs = {}
    for reference in (True, False):
        trainer.semiseg_modules.load_state_dict(start_modules)
        if hasattr(trainer, 'equivariance_second_pass'):   # the reference ran every row in one forward
            trainer.equivariance_second_pass = not reference
        # two steps: the first fills banks and queues, the second reads them
        runs[reference] = [_finetune_step(trainer, batch, unlabeled, reference, seed) for seed in (0, 1)]
        runs[reference].append(copy.deepcopy(trainer.semiseg_modules.state_dict()))
    for (terms_ref, grads_ref, rows_ref, _), (terms, grads, rows, _) in zip(runs[True][:2], runs[False][:2]):
        assert rows == {k: v for k, v in rows_ref.items() if k != 'equivariance'} and terms.keys() == terms_ref.keys()
        for key in terms_ref:
            assert terms[key] == pytest.approx(terms_ref[key], rel=1e-4, abs=1e-6), key
        assert grads.keys() == grads_ref.keys()
        # per tensor, 1e-4 of its largest entry, plus 1e-6 of the step's largest gradient entry for gradients that
        # are zero in exact arithmetic (a bias before an instance norm: float32 noise of the gradient through it)
        floor = 1e-6 * max(float(g.abs().max()) for g in grads_ref.values())
        for key, g_ref in grads_ref.items():
            tolerance = 1e-4 * float(g_ref.abs().max()) + floor
            assert float((grads[key] - g_ref).abs().max()) <= tolerance, (key, tolerance)
    for key, buffer in runs[True][2].items():
        assert torch.allclose(runs[False][2][key].float(), buffer.float(), atol=1e-5), key
    if name == 'nnUNetTrainerMONA':
        has_equivariance = attributes.get('lambda_equivariance', 1.0) > 0
        assert ('equivariance' in runs[True][0][2]) == has_equivariance          # reference: rows of the one forward
        assert 'equivariance' not in runs[False][0][2]                            # here: a second pass of its own
        assert ('equivariance' in runs[False][0][0]) == has_equivariance
        # the first pass sees labelled + unlabelled rows only; the reference ran the equivariance rows with them
        b = batch['data'].shape[0] + unlabeled['data_weak'].shape[0]
        assert runs[True][0][3] == (2 * b if has_equivariance else b)
        assert runs[False][0][3] == b
    stop_loaders(trainer)


def test_action_teacher_reads_the_unlabelled_rows_only(phantom):
    """ACTION's fine-tuning terms read the teacher's pseudo-labels only; ACTION++'s ASCL also reads its labelled
    features, and pre-training reads both. (With the pseudo-label gate open: while it is closed the teacher also reads
    the labelled rows, to measure its Dice there, tests/test_unsup_gate.py.)"""
    seen = {}
    for name in ('nnUNetTrainerACTION', 'nnUNetTrainerACTIONpp'):
        trainer = make_trainer(phantom, name, '2d', epochs=3, iterations=2, fold=1)
        trainer.unsup_gate_threshold = None
        trainer.on_train_start()
        calls = []
        original = trainer.teacher_forward
        trainer.teacher_forward = lambda x: (calls.append(x.shape[0]), original(x))[1]
        batch, unlabeled = next(trainer.dataloader_train), next(trainer.dataloader_unlabeled)
        for phase_step in (0, trainer.pretrain_iterations):
            trainer.semiseg_step = phase_step
            trainer._features.clear()
            trainer.prepare_student_input(batch['data'], unlabeled['data_weak'], unlabeled['data_strong'])
        seen[name] = calls
        stop_loaders(trainer)
    n_l, n_u = batch['data'].shape[0], unlabeled['data_weak'].shape[0]
    assert seen['nnUNetTrainerACTION'] == [n_l + n_u, n_u]
    assert seen['nnUNetTrainerACTIONpp'] == [n_l + n_u, n_l + n_u]

