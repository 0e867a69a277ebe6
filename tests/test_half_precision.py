"""Every contrastive loss computes its similarities, logits, softmax and log-softmax in float32 whatever it is fed:
float16 / bfloat16 features (what heads return under AMP) give the float32 result on the same values, a
bfloat16 CPU autocast region changes nothing, and the "zero that keeps the graph" of an inactive loss stays 0 when a
half-precision map sums beyond float16's range (65504)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from nnunet_semiseg.contrast.anatomical import AnatomicalContrastLoss
from nnunet_semiseg.contrast.ascl import AdaptiveSupervisedContrastLoss, hungarian_assignment
from nnunet_semiseg.contrast.distillation import GlobalDistillationLoss, LocalDistillationLoss
from nnunet_semiseg.contrast.mona import EquivarianceLoss, NearestNeighbourLoss
from nnunet_semiseg.contrast.pixel_contrast import PixelContrastLoss, entropy_masks
from nnunet_semiseg.contrast.pseudo_label import pseudo_labels, unsup_pseudo_label_loss

HALF = [torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed))


def _class_maps(b=2, c=3, h=16, w=16, seed=0):
    """Labels in vertical stripes of every class, teacher probabilities confident in them (p > 0.3), ``[B, *sp]``
    and ``[B, C, *sp]``."""
    labels = (torch.arange(w) * c // w).expand(b, h, w).clone()
    probs = torch.softmax(3 * F.one_hot(labels, c).movedim(-1, 1).float() + _randn(b, c, h, w, seed=seed), 1)
    return labels, probs


# Each case: (inputs, loss(inputs, module) -> 0-dim tensor, module). Float inputs are the ones a caller may hand over
# in half precision; the module is deep-copied per call, so banks pushed inside forward do not leak between calls.
def _global_distillation():
    module = GlobalDistillationLoss(dim=16, bank_size=8, tau_s=0.1, tau_t=0.01)   # teacher logits up to 100
    module.enqueue(_randn(8, 16, seed=1))
    return ({'student': _randn(6, 16, seed=2), 'teacher': _randn(6, 16, seed=3)},
            lambda x, m: m(x['student'], x['teacher']), module)


def _local_distillation():
    module = LocalDistillationLoss(num_windows=3, embed_dim=8, bank_size=5, tau_s=0.1, tau_t=0.01)
    module.enqueue(_randn(5, 3, 2, 4, seed=4))
    return ({'student': _randn(4, 3, 2, 4, seed=5), 'teacher': _randn(4, 3, 2, 4, seed=6)},
            lambda x, m: m(x['student'], x['teacher']), module)


def _pixel_contrast(mode):
    def case():
        labels, probs = _class_maps(seed=7)
        module = PixelContrastLoss(3, num_queries=16, num_negatives=32, temperature=0.1, negative_mode=mode,
                                   rep_dim=8, bank_size=64, sampler='sag')
        inputs = {'student': _randn(2, 8, 16, 16, seed=8), 'teacher': _randn(2, 8, 16, 16, seed=9), 'probs': probs,
                  'labels': labels, 'is_labeled': torch.tensor([True, False])}
        return inputs, lambda x, m: m(x['student'], x['teacher'], x['labels'], x['probs'],
                                      is_labeled=x['is_labeled'], generator=_gen(10)), module
    return case


def _anatomical_contrast():
    labels = torch.randint(0, 4, (2, 12, 12), generator=_gen(11))
    inputs = {'feats': _randn(2, 8, 12, 12, seed=12), 'probs': torch.softmax(_randn(2, 4, 12, 12, seed=13), 1),
              'labels': labels}
    return (inputs, lambda x, m: m(x['feats'], x['labels'], x['probs'], tau=0.1, generator=_gen(14)),
            AnatomicalContrastLoss(num_queries=16, num_negatives=32))


def _adaptive_supervised_contrast():
    module = AdaptiveSupervisedContrastLoss(3, 16, queue_size=40, tau=0.1)
    module.queue.push(F.normalize(_randn(30, 16, seed=15), dim=1), torch.arange(3).repeat(10))
    inputs = {'student': _randn(12, 16, seed=16), 'teacher': _randn(12, 16, seed=17),
              'labels': torch.arange(3).repeat(4)}
    return inputs, lambda x, m: m(x['student'], x['teacher'], x['labels'], tau=0.1), module   # update=True


def _nearest_neighbour():
    module = NearestNeighbourLoss(dim=8, bank_size=10, topk=3)
    module.bank.push(F.normalize(_randn(10, 8, seed=18), dim=1))
    return ({'student': _randn(3, 8, 6, 6, seed=19), 'teacher': _randn(3, 8, 6, 6, seed=20)},
            lambda x, m: m(x['student'], x['teacher']), module)


def _equivariance():
    mask = torch.rand(2, 10, 10, generator=_gen(21)) > 0.5
    return ({'pred': 4 * _randn(2, 3, 10, 10, seed=22), 'target': 4 * _randn(2, 3, 10, 10, seed=23), 'mask': mask},
            lambda x, m: m(x['pred'], x['target'], x['mask']), EquivarianceLoss())


def _pseudo_label_ce():
    labels = torch.randint(0, 3, (2, 8, 8), generator=_gen(24))
    confidence = torch.rand(2, 8, 8, generator=_gen(25))
    return ({'logits': 4 * _randn(2, 3, 8, 8, seed=26), 'labels': labels, 'confidence': confidence},
            lambda x, m: unsup_pseudo_label_loss(x['logits'], x['labels'], x['confidence'], threshold=0.5), None)


CASES = {
    'global_distillation': _global_distillation, 'local_distillation': _local_distillation,
    'pixel_contrast_paper': _pixel_contrast('paper'), 'pixel_contrast_bank': _pixel_contrast('bank'),
    'anatomical_contrast': _anatomical_contrast, 'adaptive_supervised_contrast': _adaptive_supervised_contrast,
    'nearest_neighbour': _nearest_neighbour, 'equivariance': _equivariance, 'pseudo_label_ce': _pseudo_label_ce,
}


def _to(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize('dtype', HALF, ids=str)
@pytest.mark.parametrize('case', list(CASES))
def test_half_precision_features_give_the_float32_result(case, dtype):
    inputs, loss, module = CASES[case]()
    exact = _to(_to(inputs, dtype), torch.float32)          # float32 tensors holding exactly dtype's values
    reference = loss(exact, copy.deepcopy(module))
    result = loss(_to(exact, dtype), copy.deepcopy(module))
    assert reference.dtype == result.dtype == torch.float32
    assert torch.isfinite(result) and reference.item() != 0
    # same values in, float32 arithmetic inside: equal up to float32 rounding (half arithmetic is off by ~1e-3)
    assert result.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize('case', list(CASES))
def test_bfloat16_autocast_changes_nothing(case):
    inputs, loss, module = CASES[case]()
    reference = loss(inputs, copy.deepcopy(module))
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        result = loss(inputs, copy.deepcopy(module))
    assert result.dtype == torch.float32 and torch.isfinite(result)
    assert result.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


def test_autocast_leaves_ascl_state_updates_and_assignment_in_float32():
    inputs, loss, module = _adaptive_supervised_contrast()
    plain, autocast = copy.deepcopy(module), copy.deepcopy(module)
    loss(inputs, plain)
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        loss(inputs, autocast)
    for key, value in plain.state_dict().items():
        assert torch.allclose(autocast.state_dict()[key].float(), value.float(), rtol=1e-6, atol=1e-7), key
    # two centroids 0.002 apart in cosine to two centres: bfloat16 (3 significant digits) cannot tell them apart
    centres = torch.eye(2, 4)
    centroids = F.normalize(torch.tensor([[0.999, 1.0, 0.0, 0.0], [1.001, 1.0, 0.0, 0.0]]), dim=1)
    assert hungarian_assignment(centroids, centres).tolist() == [1, 0]
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        assert hungarian_assignment(centroids, centres).tolist() == [1, 0]


def test_equivariance_warp_grid_is_float32_under_autocast():
    eqv = EquivarianceLoss()
    x = _randn(2, 3, 64, 64, seed=28)
    theta = eqv.make_transform(x.shape, _gen(29))
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        warped = eqv.warp(x, theta)                           # a bfloat16 grid moves samples by up to 0.5 pixel
    assert warped.dtype == torch.float32 and torch.allclose(warped, eqv.warp(x, theta), rtol=0, atol=1e-6)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_pseudo_labels_and_entropy_masks_are_float32(dtype):
    logits = 4 * _randn(2, 3, 8, 8, seed=27)
    probs, labels, confidence = pseudo_labels(logits.to(dtype))
    reference = pseudo_labels(logits.to(dtype).float())
    assert probs.dtype == confidence.dtype == torch.float32
    assert torch.equal(labels, reference[1]) and torch.allclose(probs, reference[0], rtol=1e-6, atol=0)
    low, high = entropy_masks(probs.to(dtype), 20.0)
    low_ref, high_ref = entropy_masks(probs.to(dtype).float(), 20.0)
    assert torch.equal(low, low_ref) and torch.equal(high, high_ref)


# Inactive losses return a zero attached to the graph. Summing a half-precision map first overflows float16
# (1e5 > 65504: inf * 0 = NaN), which the non-finite step guard would then skip every time.
def _big(*shape):
    return torch.full(shape, 200.0, dtype=torch.float16, requires_grad=True)


def _zero_cases():
    one_class = torch.zeros(2, 16, 16, dtype=torch.long)
    return {
        'global_distillation (empty bank)': lambda x: GlobalDistillationLoss(dim=512)(x.view(-1, 512)[:8],
                                                                                       x.view(-1, 512)[8:16]),
        'local_distillation (empty bank)': lambda x: LocalDistillationLoss(4, 128)(x.view(-1, 4, 128)[:8],
                                                                                  x.view(-1, 4, 128)[8:16]),
        'pixel_contrast (one class)': lambda x: PixelContrastLoss(2, negative_mode='paper')(
            x, x.detach(), one_class, F.one_hot(one_class, 2).movedim(-1, 1).float()),
        'anatomical_contrast (one class)': lambda x: AnatomicalContrastLoss()(
            x, one_class, F.one_hot(one_class, 2).movedim(-1, 1).float()),
        'nearest_neighbour (empty bank)': lambda x: NearestNeighbourLoss(dim=16)(x, x.detach()),
        'equivariance (empty mask)': lambda x: EquivarianceLoss()(x, x.detach(),
                                                                  torch.zeros(2, 16, 16, dtype=torch.bool)),
        'pseudo_label_ce (all ignored)': lambda x: unsup_pseudo_label_loss(x, torch.full((2, 16, 16), -1),
                                                                           torch.ones(2, 16, 16)),
    }


@pytest.mark.parametrize('case', list(_zero_cases()))
def test_inactive_loss_is_zero_not_nan_for_large_half_precision_maps(case):
    x = _big(2, 16, 16, 16)                                   # sums to 1.6e6 in float16: inf
    assert torch.isinf(x.detach().sum())
    value = _zero_cases()[case](x)
    assert value.dtype == torch.float32 and value.item() == 0.0
    value.backward()                                          # the zero keeps the graph (DDP sees every parameter)
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
