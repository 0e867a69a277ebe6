"""MONA's other fine-tuning terms (spec arco_mona.md §5) and the CutMix strong-view mixing."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_semiseg.augment import cutmix, cutmix_box_mask
from nnunet_semiseg.contrast.mona import EquivarianceLoss, NearestNeighbourLoss, confidence_weighted_ce


# ---------------------------------------------------------------------------------------------------------- L_nn
def test_nn_loss_is_zero_with_graph_until_the_bank_fills_then_teacher_is_enqueued():
    nn_loss = NearestNeighbourLoss(dim=4, bank_size=6, topk=2)
    s = torch.randn(3, 4, 5, 5, requires_grad=True)
    t = torch.randn(3, 4, 5, 5)
    out = nn_loss(s, t)
    assert out.item() == 0.0 and out.requires_grad
    assert len(nn_loss.bank) == 3
    assert torch.allclose(nn_loss.bank.get(), F.normalize(t.mean((2, 3)), dim=1))   # pooled, normalised teacher
    assert 'bank.feats' in nn_loss.state_dict()


def test_nn_loss_has_a_gradient_after_the_bank_fills():
    # spec B2: the released code's L_nn is a constant (no gradient); here it reaches the student reps
    g = torch.Generator().manual_seed(0)
    nn_loss = NearestNeighbourLoss(dim=8, bank_size=36, topk=5)
    nn_loss(torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 8, 6, 6, generator=g))
    s = torch.randn(4, 8, 6, 6, generator=g, requires_grad=True)
    t = torch.randn(4, 8, 6, 6, generator=g, requires_grad=True)
    out = nn_loss(s, t)
    out.backward()
    assert out.item() > 0
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert len(nn_loss.bank) == 8


def test_nn_neighbours_are_chosen_by_the_teacher_distance_by_the_student():
    nn_loss = NearestNeighbourLoss(dim=2, bank_size=4, topk=1)
    nn_loss.bank.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    t = torch.tensor([[1.0, 0.1]])      # teacher's nearest bank entry: (1, 0)
    s = torch.tensor([[0.1, 1.0]])      # the student's own nearest would be (0, 1)
    out = nn_loss(s, t, enqueue=False)
    expected = 2 - 2 * 0.1 / math.sqrt(1.01)          # 2 - 2 cos(s, (1, 0))
    assert out.item() == pytest.approx(expected, abs=1e-6)
    assert len(nn_loss.bank) == 2
    # topk larger than the bank: all entries, mean distance
    nn_loss.topk = 5
    both = nn_loss(s, t, enqueue=False).item()
    assert both == pytest.approx((expected + 2 - 2 * 1.0 / math.sqrt(1.01)) / 2, abs=1e-6)


# ------------------------------------------------------------------------------------------------------- L_unsup
def test_confidence_weighted_ce_weights_each_image_by_its_confident_fraction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    ce = F.cross_entropy(logits, labels, reduction='none')          # all > 0 for random logits
    assert (ce > 0).all()
    all_conf = torch.ones(2, 4, 4)
    assert confidence_weighted_ce(logits, labels, all_conf).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    half = torch.zeros(2, 4, 4)
    half[:, :2] = 0.99                                                # half of every image is confident
    assert confidence_weighted_ce(logits, labels, half).item() == pytest.approx(0.5 * ce.mean().item(), rel=1e-6)
    per_image = half.clone()
    per_image[1] = 0.5                                                # image 1: nothing confident -> weight 0
    expected = (0.5 * ce[0].sum()) / ce.numel()
    assert confidence_weighted_ce(logits, labels, per_image).item() == pytest.approx(expected.item(), rel=1e-6)


def test_confidence_weighted_ce_ignores_labels_and_keeps_graph():
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), -1, dtype=torch.long)
    out = confidence_weighted_ce(logits, labels, torch.ones(1, 2, 2))
    assert out.item() == 0.0 and out.requires_grad
    labels[0, 0, 0] = 1                                               # one valid pixel, CE = log 2, weight 1
    conf = torch.zeros(1, 2, 2)
    conf[0, 0, 0] = 1.0
    assert confidence_weighted_ce(logits, labels, conf).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------------------- L_eqv
@pytest.mark.parametrize('shape', [(2, 3, 16, 16), (2, 3, 8, 12, 12)])
def test_equivariance_zero_for_an_equivariant_model_positive_otherwise(shape):
    eqv = EquivarianceLoss()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    mask = torch.ones(shape[:1] + shape[2:], dtype=torch.bool)
    identity = lambda inp: inp                                        # noqa: E731 (logits = x)
    assert eqv.from_model(identity, x, identity(x), mask, generator=g).item() == 0.0
    ramp = torch.linspace(0, 3, shape[-1])              # position-dependent sharpening: not equivariant
    biased = lambda inp: inp * (1 + ramp)                             # noqa: E731
    assert eqv.from_model(biased, x, biased(x), mask, generator=torch.Generator().manual_seed(0)).item() > 1e-3


def test_equivariance_transform_and_warp():
    eqv = EquivarianceLoss()
    a = eqv.make_transform((3, 1, 8, 8), torch.Generator().manual_seed(4))
    b = eqv.make_transform((3, 1, 8, 8), torch.Generator().manual_seed(4))
    assert a.shape == (3, 2, 3) and torch.equal(a, b) and torch.equal(a[0], a[2])   # one T for the batch
    assert eqv.make_transform((2, 1, 4, 4, 4), torch.Generator().manual_seed(4)).shape == (2, 3, 4)
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).expand(2, 2, 3)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(eqv.warp(x, identity), x, atol=1e-6)
    m = torch.rand(2, 8, 8) > 0.5
    assert torch.equal(eqv.warp(m, identity), m) and eqv.warp(m, a[:2]).dtype == torch.bool
    labels = torch.randint(0, 4, (2, 8, 8))
    assert torch.equal(eqv.warp(labels, identity), labels)


def test_equivariance_kl_masked_and_normalised():
    eqv = EquivarianceLoss()
    target = torch.zeros(1, 2, 1, 2)
    target[0, 0, 0, 0] = math.log(3.0)                              # pixel 0: target (3/4, 1/4); pixel 1 uniform
    pred = torch.zeros(1, 2, 1, 2, requires_grad=True)              # prediction uniform everywhere
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    mask = torch.tensor([[[True, True]]])
    assert eqv(pred, target, mask).item() == pytest.approx(kl0 / 2, abs=1e-6)
    assert eqv(pred, target, torch.tensor([[[True, False]]])).item() == pytest.approx(kl0, abs=1e-6)
    empty = eqv(pred, target, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    labels, conf = torch.tensor([[0, 1, 2]]), torch.tensor([[0.9, 0.6, 0.8]])
    assert eqv.confidence_mask(labels, conf).tolist() == [[False, False, True]]


# -------------------------------------------------------------------------------------------------------- CutMix
def test_cutmix_applies_the_same_box_to_every_map():
    b, h, w = 4, 32, 24
    ids = torch.arange(b, dtype=torch.float32)
    images = ids.view(b, 1, 1, 1).expand(b, 2, h, w).clone()
    labels = ids.long().view(b, 1, 1).expand(b, h, w).clone()
    conf = ids.view(b, 1, 1).expand(b, h, w) / 10
    probs = ids.view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    mixed_img, mixed_lab, mixed_conf, mixed_probs, box = cutmix(images, labels, conf, probs,
                                                                generator=torch.Generator().manual_seed(0))
    source = torch.where(box, ((ids.long() + 1) % b).view(b, 1, 1), ids.long().view(b, 1, 1))   # [B, H, W]
    assert torch.equal(mixed_lab, source)
    assert torch.equal(mixed_img, source[:, None].float().expand(b, 2, h, w))
    assert torch.equal(mixed_conf, source.float() / 10)
    assert torch.equal(mixed_probs, source[:, None].float().expand(b, 3, h, w))
    assert mixed_lab.dtype == torch.long and box.dtype == torch.bool


@pytest.mark.parametrize('spatial', [(64, 48), (16, 32, 32)])
def test_cutmix_box_covers_the_requested_fraction(spatial):
    masks = cutmix_box_mask(64, spatial, torch.Generator().manual_seed(1), area_fraction=0.5)
    frac = masks.flatten(1).float().mean(1)
    # each side is rounded to a whole pixel: relative side error <= 0.5 / size, summed over axes
    tol = sum(0.5 / s for s in spatial) * 1.05
    assert (frac - 0.5).abs().max() <= tol
    for k in range(len(spatial)):  # a single box: its projection on each axis is one interval
        proj = masks.any(dim=tuple(a + 1 for a in range(len(spatial)) if a != k))
        first, last = proj.float().argmax(1), spatial[k] - 1 - proj.flip(1).float().argmax(1)
        assert torch.equal(proj.sum(1), last - first + 1)


def test_cutmix_full_extent_axes_and_determinism():
    x = torch.randn(3, 1, 8, 32, 32)
    *_, box = cutmix(x, generator=torch.Generator().manual_seed(2), full_extent_axes=(0,))
    assert torch.equal(box.any(1), box.all(1))                      # every slice gets the same in-plane box
    assert (box[:, 0].flatten(1).float().mean(1) - 0.5).abs().max() <= (0.5 / 32) * 2 * 1.05
    a = cutmix(x, generator=torch.Generator().manual_seed(3))
    b = cutmix(x, generator=torch.Generator().manual_seed(3))
    c = cutmix(x, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[-1], c[-1])
    single = torch.randn(1, 1, 8, 8)
    assert torch.equal(cutmix(single, generator=torch.Generator().manual_seed(0))[0], single)
    with pytest.raises(ValueError, match='area_fraction'):
        cutmix(x, generator=None, area_fraction=0.0)
    with pytest.raises(ValueError, match='map 0'):
        cutmix(x, torch.zeros(3, 8, 32, 31))


def test_feature_queue_never_stores_a_nonfinite_row():
    """A teacher row that overflowed (inf, or NaN after normalising) is left out; the finite rows keep their order
    and labels, and the pointer moves by their number only."""
    from nnunet_semiseg.contrast.memory import FeatureQueue
    q = FeatureQueue(size=5, dim=2, with_labels=True)
    rows = torch.tensor([[1., 2.], [float('nan'), 0.], [3., 4.], [float('inf'), 1.], [5., 6.]])
    q.push(rows, torch.tensor([0, 1, 2, 3, 4]))
    feats, labels = q.get()
    assert torch.equal(feats, torch.tensor([[1., 2.], [3., 4.], [5., 6.]]))
    assert labels.tolist() == [0, 2, 4] and len(q) == 3 and int(q.ptr) == 3
    q.push(torch.full((2, 2), float('nan')), torch.tensor([7, 8]))     # nothing finite: nothing written
    assert len(q) == 3 and int(q.ptr) == 3
