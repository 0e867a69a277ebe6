"""ACTION / ACTION++ losses, checked against the numbers of spec ``action.md`` §7 (items 4-9, 11-14, 16-21)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from nnunet_semiseg.contrast.anatomical import (AnatomicalContrastLoss, anco_valid_mask, negative_class_probs,
                                                sample_negatives, uniform_query_sampler)
from nnunet_semiseg.contrast.ascl import (AdaptiveSupervisedContrastLoss, hungarian_assignment,
                                          sample_pixels_per_class)
from nnunet_semiseg.contrast.distillation import (GlobalDistillationLoss, LocalDistillationLoss, LocalPredictionHead,
                                                  LocalProjectionHead, num_windows, pool_windows, relational_kl,
                                                  window_slices, window_starts)
from nnunet_semiseg.contrast.pseudo_label import entropy, pseudo_labels, unsup_pseudo_label_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=_gen(seed)), dim=1)


# ================================================================================ ASCL (ACTION++ §3.3-3.4)

@pytest.mark.parametrize('perm', list(itertools.permutations(range(4))))
def test_hungarian_recovers_a_permuted_assignment(perm):       # item 4
    loss = AdaptiveSupervisedContrastLoss(4, 128)
    perm = torch.tensor(perm)
    noise = 0.05 * torch.randn(4, 128, generator=_gen(1))
    centroids = F.normalize(loss.centres[perm] + noise, dim=1)
    assert torch.equal(hungarian_assignment(centroids, loss.centres), perm)


def test_centroid_ema_closed_form_after_one_update():          # item 5
    loss = AdaptiveSupervisedContrastLoss(3, 16)
    mu0 = loss.centroids.clone()
    feats = torch.randn(10, 16, generator=_gen(2)) * 3
    labels = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2, 2])       # class 1 absent
    loss.update_centroids(feats, labels)
    f = F.normalize(feats, dim=1)
    for c in (0, 2):
        expected = F.normalize(0.9 * mu0[c] + 0.1 * F.normalize(f[labels == c].mean(0), dim=0), dim=0)
        assert torch.allclose(loss.centroids[c], expected, atol=1e-6)
    assert torch.equal(loss.centroids[1], mu0[1])                # absent classes keep their centroid


def _clustered(psi_rows, noise, seed):
    return F.normalize(psi_rows + noise * torch.randn(psi_rows.shape, generator=_gen(seed)) / psi_rows.shape[1] ** 0.5,
                       dim=1)


def test_ascl_aligned_below_wrong_assignment_below_random():  # item 6
    k, d, n, tau = 4, 128, 64, 0.07
    labels = torch.arange(k).repeat_interleave(n)
    derangement = torch.tensor([1, 2, 3, 0])

    def run(case):
        loss = AdaptiveSupervisedContrastLoss(k, d, queue_size=1024, lambda_centre=0.2)
        psi = loss.centres
        loss.assignment.copy_(derangement if case == 'wrong' else torch.arange(k))

        def feats(seed):
            if case == 'random':
                return _unit(k * n, d, seed)
            return _clustered(psi[labels], 1.0, seed)               # class c sits at centre c

        for seed in range(4):
            loss.queue.push(feats(seed), labels)
        student, teacher = feats(10), feats(11)
        value = loss(student, teacher, labels, tau=tau, update=False)
        return value.item(), loss, student

    aligned, loss, student = run('aligned')
    wrong, _, _ = run('wrong')
    random_features, _, _ = run('random')
    assert aligned < wrong < random_features                    # 5.846 < 5.858 < 7.698 with these seeds
    # the two assignments differ only in the centre column: the gap is exactly
    # (lambda / N) sum_i (f_i.psi_own - f_i.psi_wrong) / (tau n_i), with n_i = 1 + 256 + 1
    f = F.normalize(student, dim=1)
    expected_gap = 0.2 * ((f * loss.centres[labels]).sum(1) - (f * loss.centres[derangement[labels]]).sum(1)) / tau
    expected_gap = (expected_gap / (1 + 4 * n + 1)).mean().item()
    assert wrong - aligned == pytest.approx(expected_gap, rel=1e-3, abs=1e-5)


def test_ascl_gradients_reach_only_the_student():              # item 7
    loss = AdaptiveSupervisedContrastLoss(3, 8, queue_size=32)
    loss.queue.push(_unit(12, 8, 0), torch.arange(3).repeat(4))
    student = torch.randn(6, 8, requires_grad=True)
    teacher = torch.randn(6, 8, requires_grad=True)
    loss(student, teacher, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert not any(b.requires_grad for b in loss.buffers())
    assert not list(loss.parameters())


def test_ascl_queue_pointer_and_wrap_around():                 # item 8
    loss = AdaptiveSupervisedContrastLoss(3, 8, queue_size=10)
    pushed_f, pushed_l = [], []
    for step in range(3):
        student, teacher = torch.randn(4, 8), torch.randn(4, 8, generator=_gen(step))
        labels = torch.tensor([step % 3, 1, 2, 0])
        loss(student, teacher, labels)
        pushed_f.append(F.normalize(teacher, dim=1))
        pushed_l.append(labels)
        assert int(loss.queue.ptr) == (4 * (step + 1)) % 10
        assert len(loss.queue) == min(10, 4 * (step + 1))
    feats, labels = loss.queue.get()                             # oldest first: the last 10 of the 12 pushed
    assert torch.allclose(feats, torch.cat(pushed_f)[-10:], atol=1e-6)
    assert torch.equal(labels, torch.cat(pushed_l)[-10:])
    assert int(loss.num_updates) == 3


def test_ascl_tiny_analytic_example():                         # item 9
    loss = AdaptiveSupervisedContrastLoss(2, 4, lambda_centre=0.0)
    loss.assignment.copy_(torch.tensor([0, 1]))
    f = F.normalize(torch.tensor([[1.0, 0.2, 0.0, 0.1]]), dim=1)
    g = F.normalize(torch.tensor([[0.9, 0.1, 0.3, 0.0]]), dim=1)
    value = loss(f, g, torch.tensor([0]), tau=0.5, update=False)
    logits = torch.cat([(f * g).sum(1), (f @ loss.centres.T).squeeze(0)]) / 0.5   # empty queue: [self | centres]
    expected = -0.5 * F.log_softmax(logits, 0)[0]                  # n = 2: the centre always counts (B16)
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.lambda_centre = 0.2
    value = loss(f, g, torch.tensor([0]), tau=0.5, update=False)
    expected = -0.5 * (F.log_softmax(logits, 0)[0] + 0.2 * F.log_softmax(logits, 0)[1])
    assert value.item() == pytest.approx(expected.item(), abs=1e-6)


def test_ascl_update_false_has_no_side_effects_and_empty_input():
    loss = AdaptiveSupervisedContrastLoss(3, 8, queue_size=16)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(torch.randn(5, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]), update=False)
    assert all(torch.equal(state[k], v) for k, v in loss.state_dict().items())
    empty = loss(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
    assert all(torch.equal(state[k], v) for k, v in loss.state_dict().items())


def test_ascl_frozen_assignment_and_validation():
    loss = AdaptiveSupervisedContrastLoss(3, 8, freeze_assignment_after=0)
    before = loss.assignment.clone()
    loss.centroids.copy_(loss.centres[torch.tensor([2, 0, 1])])
    loss(torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 2]))
    assert torch.equal(loss.assignment, before)
    with pytest.raises(ValueError, match='labels'):
        loss(torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match='centroid_momentum'):
        AdaptiveSupervisedContrastLoss(3, 8, centroid_momentum=1.0)
    with pytest.raises(ValueError, match='num_classes'):
        AdaptiveSupervisedContrastLoss(1, 8)


def test_ascl_state_dict_round_trip():
    a = AdaptiveSupervisedContrastLoss(3, 8, queue_size=16)
    a(torch.randn(6, 8), torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    b = AdaptiveSupervisedContrastLoss(3, 8, queue_size=16, centre_seed=5)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {'centres', 'centroids', 'assignment', 'num_updates', 'queue.feats',
                                   'queue.labels', 'queue.ptr', 'queue.count'}
    x = (torch.randn(6, 8, generator=_gen(1)), torch.randn(6, 8, generator=_gen(2)), torch.tensor([0, 1, 2, 2, 1, 0]))
    assert a(*x, update=False).item() == b(*x, update=False).item()


def test_sample_pixels_per_class():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :2] = 1
    labels[1, -1, -1] = 3
    labels[1, 0, 0] = -1                                         # ignore label: never drawn
    idx = sample_pixels_per_class(labels, 4, per_class=256, generator=_gen(0))
    drawn = labels.flatten()[idx]
    assert idx.shape == (3 * 256,)
    assert torch.equal(torch.bincount(drawn, minlength=4), torch.tensor([256, 256, 0, 256]))
    single = sample_pixels_per_class(torch.ones(1, 4, 4, dtype=torch.long), 4, per_class=100, generator=_gen(0))
    assert single.shape == (100,)


# ================================================================================ global distillation (§2.1)

def test_global_kl_zero_when_student_equals_teacher_and_equal_temperatures():   # item 11
    loss = GlobalDistillationLoss(dim=16)
    loss.enqueue(torch.randn(36, 16, generator=_gen(0)))
    z = torch.randn(6, 16, generator=_gen(1))
    assert loss(z, z, tau_s=0.1, tau_t=0.1, enqueue=False).item() == pytest.approx(0.0, abs=1e-6)
    sharper = loss(z, z, enqueue=False).item()                   # tau_t = 0.01 < tau_s = 0.1
    assert sharper > 1e-2
    for seed in range(5):
        assert loss(torch.randn(6, 16, generator=_gen(10 + seed)), torch.randn(6, 16), enqueue=False).item() >= -1e-6


def test_global_kl_direction_on_two_anchors():                  # item 12
    loss = GlobalDistillationLoss(dim=2)
    loss.enqueue(torch.eye(2))                                   # anchors e1, e2
    theta_s, theta_t = math.radians(20), math.radians(70)
    z_s = torch.tensor([[math.cos(theta_s), math.sin(theta_s)]])
    z_t = torch.tensor([[math.cos(theta_t), math.sin(theta_t)]])
    p_s = torch.softmax(torch.tensor([math.cos(theta_s), math.sin(theta_s)]) / 0.1, 0)
    p_t = torch.softmax(torch.tensor([math.cos(theta_t), math.sin(theta_t)]) / 0.05, 0)
    forward_kl = (p_t * (p_t / p_s).log()).sum().item()
    reverse_kl = (p_s * (p_s / p_t).log()).sum().item()
    assert abs(forward_kl - reverse_kl) > 0.5                      # 3.58 vs 6.23: the example tells them apart
    assert loss(z_s, z_t, tau_s=0.1, tau_t=0.05, enqueue=False).item() == pytest.approx(forward_kl, rel=1e-5)


def test_teacher_distribution_is_sharper():                     # item 13
    sims = torch.randn(4, 36, generator=_gen(3)).tanh()
    assert (entropy(torch.softmax(sims / 0.01, 1)) < entropy(torch.softmax(sims / 0.1, 1))).all()


def test_global_bank_excludes_current_batch_and_has_no_divisibility_constraint():   # item 14
    loss = GlobalDistillationLoss(dim=8, bank_size=36)
    student = torch.randn(5, 8, requires_grad=True)
    first = loss(student, torch.randn(5, 8))
    assert first.item() == 0.0 and first.requires_grad          # empty bank: a zero that keeps the graph
    first.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    teachers = [torch.randn(5, 8, generator=_gen(s)) for s in range(8)]   # 36 % 5 != 0
    loss = GlobalDistillationLoss(dim=8, bank_size=36)
    for step, teacher in enumerate(teachers):
        bank_before = loss.bank.get().clone()
        student = torch.randn(5, 8, generator=_gen(100 + step))
        value = loss(student, teacher)
        if step > 0:                                             # computed with the bank as it was before the call
            z_s, z_t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
            expected = relational_kl(z_s @ bank_before.T / 0.1, z_t @ bank_before.T / 0.01)
            assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # after ceil(36/5) = 8 steps every entry was replaced: the bank is the newest 36 teacher embeddings
    assert torch.allclose(loss.bank.get(), F.normalize(torch.cat(teachers), dim=1)[-36:], atol=1e-6)


def test_global_teacher_gets_no_gradient():
    loss = GlobalDistillationLoss(dim=8)
    loss.enqueue(torch.randn(10, 8))
    student, teacher = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


# ================================================================================ local distillation (§2.2)

@pytest.mark.parametrize('shape,window,stride,expected', [
    ((256, 256), 64, 32, 49),            # the code's 2D setting: 7 x 7 windows (the code uses 6 x 6 and misses 32 px)
    ((37, 50), 16, 5, 6 * 8),
    ((112, 112, 80), 20, 10, 11 * 11 * 7),
    ((20, 23, 17), 7, 4, 5 * 5 * 4),
    ((10, 12), 32, None, 1),             # a window larger than the patch is clipped to it
])
def test_local_windows_cover_everything_and_count(shape, window, stride, expected):   # item 16
    slices = window_slices(shape, window, stride)
    strides = stride or window // 2
    formula = math.prod(max(0, math.ceil((s - min(window, s)) / strides)) + 1 for s in shape)
    assert len(slices) == num_windows(shape, window, stride) == formula == expected
    covered = torch.zeros(shape)
    for sl in slices:
        covered[sl] += 1
        assert all(s.stop - s.start == min(window, n) for s, n in zip(sl, shape))
    assert bool((covered >= 1).all())
    assert window_starts(shape[0], min(window, shape[0]), strides)[-1] == shape[0] - min(window, shape[0])


@pytest.mark.parametrize('shape,window,stride,out', [((37, 50), 16, 5, 5), ((37, 50), (10, 20), (3, 7), (3, 6)),
                                                     ((64, 64), 64, 32, 8), ((20, 23, 17), 7, 4, 3)])
def test_pool_windows_equals_adaptive_pooling_of_each_crop(shape, window, stride, out):
    x = torch.randn(2, 3, *shape, generator=_gen(4))
    pool = F.adaptive_avg_pool2d if len(shape) == 2 else F.adaptive_avg_pool3d
    reference = torch.stack([pool(x[(slice(None), slice(None)) + sl], out)
                             for sl in window_slices(shape, window, stride)], dim=1)
    assert torch.allclose(pool_windows(x, window, out, stride), reference, atol=1e-5)


@pytest.mark.parametrize('conv_op,shape', [(torch.nn.Conv2d, (40, 36)), (torch.nn.Conv3d, (20, 24, 16))])
def test_local_heads_serve_2d_and_3d(conv_op, shape):
    head = LocalProjectionHead(conv_op, 4, pool_size=4, window=16)
    predictor = LocalPredictionHead(conv_op, 4)
    x = torch.randn(2, 4, *shape, generator=_gen(5))
    e = head(x)
    p = head.num_windows(shape)
    assert e.shape == (2, p, 4) + (4,) * len(shape)
    assert predictor(e).shape == e.shape
    # pooling first is exact: the two 1x1 convs are affine, so they commute with averaging
    with torch.no_grad():
        reference = pool_windows(head.reduce(head.expand(x)), 16, 4)
    assert torch.allclose(e, reference, atol=1e-5)


def test_local_distillation_matches_per_window_definition():
    b, p, e_shape, k = 2, 5, (3, 2, 2), 4
    loss = LocalDistillationLoss(num_windows=p, embed_dim=12, bank_size=k)
    bank_imgs = torch.randn(k, p, *e_shape, generator=_gen(6))
    loss.enqueue(bank_imgs)
    student, teacher = torch.randn(b, p, *e_shape, generator=_gen(7)), torch.randn(b, p, *e_shape, generator=_gen(8))
    value = loss(student, teacher, enqueue=False)
    anchors = F.normalize(bank_imgs.flatten(2), dim=2)
    total = 0.0
    for i in range(b):
        for w in range(p):
            s = F.normalize(student[i, w].flatten(), dim=0) @ anchors[:, w].T / 0.1
            t = F.normalize(teacher[i, w].flatten(), dim=0) @ anchors[:, w].T / 0.01
            p_t = torch.softmax(t, 0)
            total += (p_t * (torch.log_softmax(t, 0) - torch.log_softmax(s, 0))).sum().item()
    assert value.item() == pytest.approx(total / (b * p), rel=1e-5)
    assert loss(teacher, teacher, tau_s=0.3, tau_t=0.3, enqueue=False).item() == pytest.approx(0.0, abs=1e-6)
    all_windows = LocalDistillationLoss(num_windows=p, embed_dim=12, bank_size=k, anchors='all_windows')
    assert all_windows(student, teacher).item() == 0.0           # empty bank
    all_windows.enqueue(bank_imgs)
    assert all_windows(student, teacher).item() > 0
    assert len(all_windows.bank) == k                            # k banked + 2 pushed, capacity k


# ================================================================================ AnCo (§2.3)

def _two_class_maps(prob=0.5, batch=2, size=8):
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    labels[:, :, size // 2:] = 1
    feats = F.one_hot(labels, 2).movedim(-1, 1).float()            # class 0 = e1, class 1 = e2
    probs = torch.full((batch, 2, size, size), prob)
    return feats, labels, probs


def test_anco_analytic_value():                                  # item 17
    feats, labels, probs = _two_class_maps()
    value = AnatomicalContrastLoss()(feats.requires_grad_(), labels, probs, generator=_gen(0))
    expected = -math.log(math.exp(2) / (math.exp(2) + 512))        # = 4.2527; any same-class negative would raise it
    assert expected == pytest.approx(4.2527, abs=1e-4)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(feats.grad).all()
    flat = AnatomicalContrastLoss()(feats.detach().movedim(1, -1).reshape(-1, 2), labels.flatten(),
                                    probs.movedim(1, -1).reshape(-1, 2), generator=_gen(0))
    assert flat.item() == pytest.approx(expected, rel=1e-5)


def test_anco_zero_cases():                                      # item 18
    feats, labels, probs = _two_class_maps(prob=0.98)
    assert AnatomicalContrastLoss()(feats, labels, probs).item() == 0.0     # no hard query
    feats, labels, probs = _two_class_maps()
    one_class = torch.zeros_like(labels)
    value = AnatomicalContrastLoss()(feats.requires_grad_(), one_class, probs)
    assert value.item() == 0.0 and value.requires_grad


def test_anco_class_without_hard_queries_still_counts():
    feats, labels, probs = _two_class_maps()
    probs[:, 1] = torch.where(labels == 1, 0.99, 0.01)             # class 1 has no hard pixel
    probs[:, 0] = 1 - probs[:, 1]
    probs[:, 0][labels == 0] = 0.5
    value = AnatomicalContrastLoss()(feats, labels, probs, generator=_gen(0))
    assert value.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 512)) / 2, rel=1e-5)


def test_negatives_follow_softmax_of_prototype_cosines():       # item 19
    # four classes; prototypes at chosen angles to class 0, with a different number of candidate pixels each
    angles = torch.tensor([0.0, 30.0, 80.0, 150.0]) * math.pi / 180
    prototypes = torch.stack([angles.cos(), angles.sin()], 1)
    present = torch.ones(4, dtype=torch.bool)
    pixel_class = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 10)[torch.randperm(110, generator=_gen(1))]
    probs = negative_class_probs(prototypes, present, 0, tau=0.5)
    expected = torch.softmax(prototypes[1:] @ prototypes[0] / 0.5, 0)
    assert probs[0] == 0 and torch.allclose(probs[1:], expected, atol=1e-6)
    idx = sample_negatives(pixel_class, probs, 256, 512, generator=_gen(2))
    drawn = pixel_class[idx]
    assert idx.shape == (256, 512) and not bool((drawn == 0).any())   # never the query's class
    observed = torch.bincount(drawn.flatten(), minlength=4)[1:].double()
    expected = torch.softmax(prototypes[1:].double() @ prototypes[0].double() / 0.5, 0)   # 0.780 / 0.195 / 0.024
    # chi-square goodness of fit, 2 d.o.f.; a correct sampler fails with probability 1e-3
    assert chisquare(observed.numpy(), (expected * drawn.numel()).numpy()).pvalue > 1e-3
    # pixels uniform within a class (10 pixels of class 3)
    class3 = torch.nonzero(pixel_class == 3).flatten()
    per_pixel = torch.stack([(idx == i).sum() for i in class3]).double()
    assert chisquare(per_pixel.numpy()).pvalue > 1e-3


def test_invalid_unlabeled_pixels_are_never_used():              # item 20
    batch, size, dim = 2, 8, 6
    generator = _gen(3)
    labels = torch.randint(0, 3, (batch, size, size), generator=generator)
    feats = torch.randn(batch, dim, size, size, generator=generator)
    probs = torch.softmax(torch.randn(batch, 4, size, size, generator=generator), 1)
    confidence = torch.rand(batch, size, size, generator=generator)
    labels[1][confidence[1] < 0.7] = 3                            # class 3 exists only at invalid pixels
    valid = anco_valid_mask(confidence, torch.tensor([True, False]))   # image 0 labelled, image 1 not
    assert bool(valid[0].all()) and torch.equal(valid[1], confidence[1] >= 0.7)
    poisoned = feats.clone()
    poisoned.movedim(1, -1)[~valid] = float('nan')                # any use of an invalid pixel gives NaN
    poisoned.requires_grad_(True)
    loss = AnatomicalContrastLoss(num_queries=32, num_negatives=64)
    value = loss(poisoned, labels, probs, valid, generator=_gen(4))
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert bool((poisoned.grad.movedim(1, -1)[~valid] == 0).all())
    # identical to the loss on the valid pixels alone (same draws, same order)
    flat = loss(feats.movedim(1, -1)[valid], labels[valid], probs.movedim(1, -1)[valid], generator=_gen(4))
    assert value.item() == pytest.approx(flat.item(), rel=1e-6)


def test_anco_query_sampler_weights_and_mask_shape():
    feats, labels, probs = _two_class_maps()
    seen = []

    def doubling_sampler(mask, n, generator=None):
        seen.append(tuple(mask.shape))
        indices, weights = uniform_query_sampler(mask, n, generator=generator)
        return indices, 2 * weights

    value = AnatomicalContrastLoss(query_sampler=doubling_sampler)(feats, labels, probs, generator=_gen(0))
    assert seen == [(2, 8, 8), (2, 8, 8)]
    assert value.item() == pytest.approx(2 * 4.252653, rel=1e-5)


def test_anco_is_deterministic_and_float32_under_autocast():
    generator = _gen(5)
    labels = torch.randint(0, 4, (2, 16, 16), generator=generator)
    feats = torch.randn(2, 8, 16, 16, generator=generator)
    probs = torch.softmax(torch.randn(2, 4, 16, 16, generator=generator), 1)
    loss = AnatomicalContrastLoss(tau=0.5)
    a = loss(feats, labels, probs, generator=_gen(6))
    b = loss(feats, labels, probs, generator=_gen(6))
    assert a.item() == b.item()
    assert loss(feats, labels, probs, tau=0.1, generator=_gen(6)).item() != a.item()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        c = loss(feats, labels, probs, generator=_gen(6))
    assert c.dtype == torch.float32 and c.item() == pytest.approx(a.item(), rel=1e-6)


def test_anco_validation():
    with pytest.raises(ValueError, match='num_queries'):
        AnatomicalContrastLoss(num_queries=0)
    with pytest.raises(ValueError, match='tau'):
        AnatomicalContrastLoss(tau=0)
    feats, labels, probs = _two_class_maps()
    with pytest.raises(ValueError, match='labels'):
        AnatomicalContrastLoss()(feats, labels[:, :4], probs)


# ================================================================================ pseudo-label CE (§2.4)

def _pl_inputs(seed=7):
    generator = _gen(seed)
    logits = torch.randn(2, 3, 6, 6, generator=generator)
    labels = torch.randint(0, 3, (2, 6, 6), generator=generator)
    return logits, labels


def test_pseudo_label_ce_weighting():                           # item 21
    logits, labels = _pl_inputs()
    mean_ce = F.cross_entropy(logits, labels).item()
    all_confident = torch.full((2, 6, 6), 0.99)
    assert unsup_pseudo_label_loss(logits, labels, all_confident).item() == pytest.approx(mean_ce, rel=1e-6)
    half = torch.full((2, 6, 6), 0.5)
    half[:, :3] = 0.99
    assert unsup_pseudo_label_loss(logits, labels, half).item() == pytest.approx(0.5 * mean_ce, rel=1e-6)
    mixed = torch.full((2, 6, 6), 0.5)
    mixed[0] = 0.97                                              # >= threshold counts
    mixed[1, :, :3] = 0.99
    ce = F.cross_entropy(logits, labels, reduction='none')
    expected = torch.cat([ce[0].flatten() * 1.0, ce[1].flatten() * 0.5]).mean().item()
    assert unsup_pseudo_label_loss(logits, labels, mixed).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_label_ce_ignores_ignored_pixels():
    logits, labels = _pl_inputs()
    labels[:, 0] = -1                                            # 6 of 36 pixels per image ignored
    confidence = torch.full((2, 6, 6), 0.5)
    confidence[:, 1:4] = 0.99                                    # 18 confident of 30 valid
    ce = F.cross_entropy(logits, labels, reduction='none', ignore_index=-1)
    expected = (ce[:, 1:] * 18 / 30).mean().item()
    assert unsup_pseudo_label_loss(logits, labels, confidence).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_labels_helper():
    logits, _ = _pl_inputs()
    probs, labels, confidence = pseudo_labels(logits)
    assert torch.equal(labels, logits.argmax(1))
    assert torch.allclose(confidence, torch.softmax(logits, 1).max(1).values)
    assert entropy(probs).shape == labels.shape


# ================================================================================ float32 under autocast

def test_contrastive_logits_are_float32_under_autocast():
    ascl = AdaptiveSupervisedContrastLoss(3, 16, queue_size=64)
    ascl.queue.push(_unit(30, 16, 0), torch.arange(3).repeat(10))
    glob = GlobalDistillationLoss(dim=16)
    glob.enqueue(torch.randn(36, 16, generator=_gen(1)))
    student, teacher = torch.randn(9, 16, generator=_gen(2)), torch.randn(9, 16, generator=_gen(3))
    labels = torch.arange(3).repeat(3)
    local = LocalDistillationLoss(num_windows=3, embed_dim=4, bank_size=8)
    local.enqueue(torch.randn(8, 3, 4, generator=_gen(4)))
    windows_s, windows_t = student[:, :12].reshape(9, 3, 4), teacher[:, :12].reshape(9, 3, 4)

    def losses():
        return (ascl(student, teacher, labels, update=False), glob(student, teacher, enqueue=False),
                local(windows_s, windows_t, enqueue=False))

    reference = losses()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        under_autocast = losses()
    for ref, value in zip(reference, under_autocast):
        assert value.dtype == torch.float32 and value.item() == pytest.approx(ref.item(), rel=1e-6)
