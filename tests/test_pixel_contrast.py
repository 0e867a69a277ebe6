"""PixelContrastLoss (MONA/ARCO anatomical contrast, spec arco_mona.md §3) and the entropy reliability masks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_semiseg.contrast.pixel_contrast import PixelContrastLoss, entropy_alpha, entropy_masks, _percentile

TAU, K = 0.5, 512
# anchor == positive, orthogonal to every negative: CE = -log(e^{1/tau} / (e^{1/tau} + K e^0))
CE_ORTHOGONAL = math.log1p(K * math.exp(-1.0 / TAU))


def onehot_case(labels, num_classes, dim=None):
    """Student and teacher reps = one-hot of the pixel's class (orthogonal classes), one-hot teacher probs."""
    dim = dim or num_classes
    lab = torch.as_tensor(labels)
    reps = F.one_hot(lab.clamp_min(0), dim).movedim(-1, 1).float()
    probs = F.one_hot(lab.clamp_min(0), num_classes).movedim(-1, 1).float()
    return reps, reps.clone(), lab, probs


def striped_labels(b, h, w, classes):
    """[b, h, w] labels with vertical stripes of the given classes (equal width)."""
    lab = torch.empty(b, h, w, dtype=torch.long)
    for i, c in enumerate(classes):
        lab[..., i * w // len(classes):(i + 1) * w // len(classes)] = c
    return lab


def test_orthogonal_one_hot_value_paper_mode():
    assert CE_ORTHOGONAL == pytest.approx(4.2527, abs=1e-4)
    s, t, lab, p = onehot_case(striped_labels(2, 8, 8, [0, 1, 2]), 3)
    loss = PixelContrastLoss(3, temperature=TAU, num_negatives=K, negative_mode='paper', sampler='naive')
    out = loss(s, t, lab, p, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(CE_ORTHOGONAL, abs=1e-4)


@pytest.mark.parametrize('sampler', ['naive', 'sg', 'sag'])
@pytest.mark.parametrize('mode', ['paper', 'bank'])
def test_middle_class_missing_is_indexed_by_class_id(sampler, mode):
    # U2PL #111 / spec B3: classes {0, 1, 3} present, 2 absent. Indexing prototypes or banks by loop position
    # instead of class id would contrast class-3 anchors with the class-2 slot (orthogonal) and raise the loss.
    s, t, lab, p = onehot_case(striped_labels(2, 8, 12, [0, 1, 3]), 4)
    # negatives drawn naively: SG/SAG negative weights are unbiased only on average over anchors, which would
    # blur the exact value checked here
    loss = PixelContrastLoss(4, temperature=TAU, num_negatives=K, negative_mode=mode, rep_dim=4, sampler=sampler,
                             sample_negatives_with='naive')
    out = loss(s, t, lab, p, is_labeled=torch.ones(2, dtype=torch.bool), generator=torch.Generator().manual_seed(1))
    assert out.item() == pytest.approx(CE_ORTHOGONAL, abs=1e-4)
    if mode == 'bank':  # class 2 is absent as a label but still receives negatives (everything is "not 2")
        assert len(loss.banks[2]) > 0


def test_fewer_than_two_classes_gives_zero_with_graph():
    s, t, lab, p = onehot_case(torch.ones(2, 6, 6, dtype=torch.long), 3)
    s.requires_grad_(True)
    out = PixelContrastLoss(3, negative_mode='paper')(s, t, lab, p)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # a class that is present but has no reliable pixel (low_mask False) does not count either
    lab2 = striped_labels(2, 6, 6, [0, 1])
    s2, t2, _, p2 = onehot_case(lab2, 3)
    low = lab2 == 0
    assert PixelContrastLoss(3, negative_mode='paper')(s2, t2, lab2, p2, low_mask=low).item() == 0.0


def test_absent_classes_and_ignore_label_skip_cleanly():
    lab = striped_labels(1, 8, 8, [0, 2])
    lab[:, :2] = -1                            # ignored rows
    s, t, _, p = onehot_case(lab, 5)           # classes 1, 3, 4 absent
    out = PixelContrastLoss(5, temperature=TAU, num_negatives=K, negative_mode='paper')(s, t, lab, p)
    assert out.item() == pytest.approx(CE_ORTHOGONAL, abs=1e-4)


def test_gradient_reaches_student_reps_only():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    lab = striped_labels(2, 8, 8, [0, 1, 2])
    p = torch.softmax(torch.randn(2, 3, 8, 8, generator=g), 1)
    loss = PixelContrastLoss(3, negative_mode='paper', anchor_threshold=0.0, num_queries=32, num_negatives=16)
    loss(s, t, lab, p, generator=g).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def _record_negatives(loss, monkeypatch):
    seen = []
    original = loss._negatives

    def wrapper(c, *args):
        table, index, logw = original(c, *args)   # negative (q, k) = table[index[q, k]]
        seen.append((c, table[index]))
        return table, index, logw
    monkeypatch.setattr(loss, '_negatives', wrapper)
    return seen


@pytest.mark.parametrize('mode', ['paper', 'bank'])
def test_negatives_never_of_the_anchor_class(mode, monkeypatch):
    # teacher reps carry a one-hot class code in the first C dims plus noise in the rest: a negative of class c
    # would have a non-zero component on dim c
    g = torch.Generator().manual_seed(3)
    c_num, d = 4, 12
    lab = striped_labels(2, 8, 16, [0, 1, 2, 3])
    t = torch.cat((F.one_hot(lab, c_num).movedim(-1, 1).float(), torch.randn(2, d - c_num, 8, 16, generator=g)), 1)
    s = torch.randn(2, d, 8, 16, generator=g)
    p = torch.softmax(3 * torch.randn(2, c_num, 8, 16, generator=g), 1)
    high = torch.rand(2, 8, 16, generator=g) > 0.5
    loss = PixelContrastLoss(c_num, negative_mode=mode, rep_dim=d, anchor_threshold=0.0, num_queries=16,
                             num_negatives=32, sampler='sg')
    seen = _record_negatives(loss, monkeypatch)
    for _ in range(2):  # the second step draws from the filled bank
        loss(s, t, lab, p, high_mask=high, is_labeled=torch.tensor([True, False]), generator=g)
    assert {c for c, _ in seen} == {0, 1, 2, 3}
    for c, neg in seen:
        assert neg[..., c].abs().max() == 0.0
    if mode == 'bank':
        for c in range(c_num):
            assert loss.banks[c].get()[:, c].abs().max() == 0.0


def test_bank_fills_only_with_intended_negatives():
    # C = 3: r_l = 2, r_h = 3, delta_n = 0.97. Teacher reps one-hot over the 8 pixels identify each bank entry.
    probs = torch.tensor([
        # labelled image: rule = label != c & rank_c < 2 & p_c < 0.97
        [[0.98, 0.01, 0.01], [0.5, 0.4, 0.1], [0.01, 0.01, 0.98], [0.0, 0.0, 1.0]],
        # unlabelled image: rule = high & label != c & rank_c in [2, 3) & p_c < 0.97
        [[0.5, 0.3, 0.2], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3]],
    ]).permute(0, 2, 1).reshape(2, 3, 2, 2)
    labels = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 0]]).reshape(2, 2, 2)
    high = torch.tensor([[True] * 4, [True, True, True, False]]).reshape(2, 2, 2)
    teacher = torch.eye(8).reshape(8, 2, 2, 2).permute(1, 0, 2, 3)           # [B=2, D=8, 2, 2]
    loss = PixelContrastLoss(3, negative_mode='bank', rep_dim=8, num_queries=4, num_negatives=4)
    loss(torch.randn(2, 8, 2, 2), teacher, labels, probs, high_mask=high,
         is_labeled=torch.tensor([True, False]), generator=torch.Generator().manual_seed(0))
    expected = {0: [2, 3, 6],   # p6: unlabelled, rank 2; not p5 (c=0 is its rank 0)
                1: [0, 1, 3],   # not p4 (rank 1: not hard), p5 (rank 2 but pseudo-label 1), p7 (not in high_mask)
                2: [0, 4]}      # not p1 (rank 2, outside top-2), p2 (p_2 = 0.98 >= delta_n); p4: rank 2
    for c, pixels in expected.items():
        got = sorted(loss.banks[c].get().argmax(1).tolist())
        assert got == pixels, (c, got)


def test_bank_nonempty_after_one_step_on_binary_problem():
    # spec B1: with the released ranks (low_rank=3) a 2-class bank stays empty forever; r_l = min(3, C-1) = 1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 16, 16, generator=g)
    probs = torch.softmax(logits, 1)
    labels = probs.argmax(1)
    low, high = entropy_masks(probs[2:], 20.0)
    low = torch.cat((torch.ones_like(low[:2]), low))
    high = torch.cat((torch.ones_like(high[:2]), high))
    loss = PixelContrastLoss(2, negative_mode='bank', rep_dim=8, num_queries=8, num_negatives=8)
    assert loss.low_rank == 1 and loss.high_rank == 2
    loss(torch.randn(4, 8, 16, 16, generator=g), torch.randn(4, 8, 16, 16, generator=g), labels, probs,
         low_mask=low, high_mask=high, is_labeled=torch.tensor([True, True, False, False]), generator=g)
    assert len(loss.banks[0]) > 0 and len(loss.banks[1]) > 0
    assert 'banks.1.feats' in loss.state_dict()


def test_bank_falls_back_to_batch_negatives_while_empty():
    # labelled binary images with a correct teacher have no intended negatives (rank_c < 1 means c is the
    # argmax, so label != c never holds): the bank stays empty and the loss equals the 'paper' loss
    g = torch.Generator().manual_seed(5)
    lab = striped_labels(2, 8, 8, [0, 1])
    s, t = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    p = F.one_hot(lab, 2).movedim(-1, 1).float() * 0.9 + 0.05
    kw = dict(num_queries=16, num_negatives=32, sampler='sg', rep_dim=6)
    bank = PixelContrastLoss(2, negative_mode='bank', **kw)
    paper = PixelContrastLoss(2, negative_mode='paper', **kw)
    out_bank = bank(s, t, lab, p, is_labeled=torch.ones(2, dtype=torch.bool),
                    generator=torch.Generator().manual_seed(9))
    out_paper = paper(s, t, lab, p, generator=torch.Generator().manual_seed(9))
    assert len(bank.banks[0]) == 0 and len(bank.banks[1]) == 0
    assert out_bank.item() == pytest.approx(out_paper.item(), rel=1e-6)
    assert out_bank.item() > 0


def test_stratified_negatives_are_shuffled_across_anchors(monkeypatch):
    # SG returns draws grouped by stratum; dealt out in that order, anchor 0 would only see the first cells.
    # Teacher reps encode the column (dims 3..) of each pixel: anchor 0's negatives must span the whole width.
    lab = striped_labels(1, 16, 16, [0, 1, 2])
    t = torch.cat((F.one_hot(lab, 3).movedim(-1, 1).float(),
                   F.one_hot(torch.arange(16).expand(1, 16, 16), 16).movedim(-1, 1).float()), 1)
    loss = PixelContrastLoss(3, negative_mode='paper', sampler='sg', num_queries=8, num_negatives=64)
    seen = _record_negatives(loss, monkeypatch)
    loss(torch.randn(1, 19, 16, 16), t, lab, F.one_hot(lab, 3).movedim(-1, 1).float(),
         generator=torch.Generator().manual_seed(0))
    c, neg = seen[0]
    columns = neg[0, :, 3:].argmax(1)
    assert columns.max() - columns.min() >= 8, columns   # both other-class stripes, not one cell


def naive_with_weight(weight):
    """Stand-in sampler: uniform draws with replacement, every weight = ``weight``."""
    def fn(mask, n, generator=None):
        idx = torch.randint(int(mask.sum()), (n,), generator=generator)
        return idx, torch.full((n,), float(weight))
    return fn


def test_sampler_weights_are_used():
    s, t, lab, p = onehot_case(striped_labels(2, 8, 8, [0, 1, 2]), 3)
    gen = torch.Generator().manual_seed(0)
    # anchors weighted 2, negatives naive (weight 1): the per-class mean of w * CE doubles
    anchors_only = PixelContrastLoss(3, temperature=TAU, num_negatives=K, negative_mode='paper',
                                     sampler=naive_with_weight(2.0), sample_negatives_with='naive')
    assert anchors_only(s, t, lab, p, generator=gen).item() == pytest.approx(2 * CE_ORTHOGONAL, abs=1e-4)
    # negatives weighted 2 as well: each negative counts twice in the softmax denominator
    both = PixelContrastLoss(3, temperature=TAU, num_negatives=K, negative_mode='paper',
                             sampler=naive_with_weight(2.0))
    expected = 2 * math.log1p(2 * K * math.exp(-1.0 / TAU))
    assert both(s, t, lab, p, generator=gen).item() == pytest.approx(expected, abs=1e-4)


def test_deterministic_under_generator_and_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    lab = striped_labels(2, 16, 16, [0, 1, 2])
    p = torch.softmax(torch.randn(2, 3, 16, 16, generator=g), 1)
    loss = PixelContrastLoss(3, negative_mode='paper', sampler='sag', anchor_threshold=0.1, num_queries=32,
                             num_negatives=32)
    a = loss(s, t, lab, p, generator=torch.Generator().manual_seed(7))
    b = loss(s, t, lab, p, generator=torch.Generator().manual_seed(7))
    c = loss(s, t, lab, p, generator=torch.Generator().manual_seed(8))
    assert a.item() == b.item() and a.item() != c.item()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss(s.bfloat16(), t.bfloat16(), lab, p, generator=torch.Generator().manual_seed(7))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_3d_and_reduced_resolution_reps():
    # reps at 1/2 resolution of the labels: labels, probs and masks are nearest-resized; same as resizing first
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (2, 4, 8, 8), generator=g)
    p = torch.softmax(torch.randn(2, 3, 4, 8, 8, generator=g), 1)
    s, t = torch.randn(2, 6, 2, 4, 4, generator=g), torch.randn(2, 6, 2, 4, 4, generator=g)
    loss = PixelContrastLoss(3, negative_mode='paper', sampler='sg', anchor_threshold=0.0, num_queries=16,
                             num_negatives=16)
    full = loss(s, t, lab, p, generator=torch.Generator().manual_seed(1))
    small = loss(s, t, lab[:, ::2, ::2, ::2], p[:, :, ::2, ::2, ::2], generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(full) and full.item() == pytest.approx(small.item(), rel=1e-6)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match='sampler'):
        PixelContrastLoss(3, sampler='random')
    with pytest.raises(ValueError, match='rep_dim'):
        PixelContrastLoss(3, negative_mode='bank')
    with pytest.raises(ValueError, match='negative_mode'):
        PixelContrastLoss(3, negative_mode='official')
    with pytest.raises(ValueError, match='num_classes'):
        PixelContrastLoss(1, negative_mode='paper')
    s, t, lab, p = onehot_case(striped_labels(1, 4, 4, [0, 1]), 2)
    with pytest.raises(ValueError, match='is_labeled'):
        PixelContrastLoss(2, rep_dim=2)(s, t, lab, p)
    with pytest.raises(ValueError, match='teacher_probs'):
        PixelContrastLoss(3, negative_mode='paper')(s, t, lab, p)


def test_entropy_masks_select_percentiles():
    # 100 pixels with strictly increasing entropy: alpha = 20 -> the 20 lowest are reliable, the 20 highest not
    conf = torch.linspace(0.99, 0.5, 100)
    probs = torch.stack((conf, 1 - conf)).reshape(1, 2, 10, 10)
    low, high = entropy_masks(probs, 20.0)
    flat_low, flat_high = low.flatten(), high.flatten()
    assert flat_low[:20].all() and not flat_low[20:].any()   # percentile 20 of 100 values lies at rank 19.8
    assert flat_high[80:].all() and not flat_high[:80].any()
    valid = torch.zeros(1, 10, 10, dtype=torch.bool)
    valid[0, :5] = True                                       # the 50 most confident pixels only
    low, high = entropy_masks(probs, 20.0, valid=valid)
    assert int(low.sum()) == 10 and int(high.sum()) == 10 and not (high & ~valid).any()
    x = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 12.5, 20.0, 80.0, 100.0):
        assert _percentile(x, q).item() == pytest.approx(float(np.percentile(x.numpy(), q)), abs=1e-6)


def test_entropy_alpha_schedule():
    assert entropy_alpha(0, 100) == 20.0
    assert entropy_alpha(50, 100) == 10.0
    assert entropy_alpha(100, 100) == 0.0
    with pytest.raises(ValueError, match='max_epoch'):
        entropy_alpha(0, 0)


def test_bank_negatives_are_read_in_place_and_a_push_before_the_backward_is_refused():
    """The bank's negatives enter the loss as the bank's own storage (no per-step copy held until the backward);
    a push between the forward and the backward would change what the gradient reads, and autograd refuses it.
    (A bank of 16 against 8 x 8 reads: the product with the whole bank, as at the defaults' 30 000 against 256 x 512.)"""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 2, 16, 16, generator=g), 1)
    labels = probs.argmax(1)
    kw = dict(low_mask=torch.ones(4, 16, 16, dtype=torch.bool), high_mask=torch.ones(4, 16, 16, dtype=torch.bool),
              is_labeled=torch.tensor([True, True, False, False]))
    loss = PixelContrastLoss(2, negative_mode='bank', rep_dim=8, num_queries=8, num_negatives=8, bank_size=16)
    teacher = torch.randn(4, 8, 16, 16, generator=g)
    loss(torch.randn(4, 8, 16, 16, generator=g), teacher, labels, probs, generator=g, **kw)   # fills the banks
    student = torch.randn(4, 8, 16, 16, generator=g, requires_grad=True)
    value = loss(student, teacher, labels, probs, generator=g, **kw)
    value.backward(retain_graph=True)                      # read from the bank as it is now
    assert student.grad is not None and torch.isfinite(student.grad).all()
    loss.banks[0].push(torch.randn(5, 8, generator=g))
    loss.banks[1].push(torch.randn(5, 8, generator=g))
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        value.backward()


@pytest.mark.parametrize('chunk_bytes', [None, 1])      # one chunk, or one query a chunk (forward and backward)
def test_products_at_index_equal_matmul_then_gather_in_value_and_gradient(monkeypatch, chunk_bytes):
    from nnunet_semiseg.contrast import pixel_contrast
    from nnunet_semiseg.contrast.pixel_contrast import dots_with_rows
    if chunk_bytes is not None:
        monkeypatch.setattr(pixel_contrast, '_CHUNK_BYTES', chunk_bytes)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(6, 5, generator=g, requires_grad=True)
    table = torch.randn(7, 5, generator=g)
    index = torch.randint(0, 7, (6, 40), generator=g)                  # 240 reads >= 4 x 7 rows: the product path
    weights = torch.randn(6, 40, generator=g)
    out = dots_with_rows(queries, table, index)
    (grad,) = torch.autograd.grad((out * weights).sum(), queries)
    plain = queries.detach().clone().requires_grad_(True)
    reference = (plain @ table.T).gather(1, index)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), plain)
    if chunk_bytes is None:    # the same operations, bit for bit
        assert torch.equal(out, reference) and torch.equal(grad, grad_reference)
    else:                      # matrix products of other shapes: float32 rounding
        assert torch.allclose(out, reference, rtol=1e-6, atol=1e-6)
        assert torch.allclose(grad, grad_reference, rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda q: dots_with_rows(q, table.double(), index),
                                     (queries.detach().double().requires_grad_(True),))


@pytest.mark.parametrize('chunk_bytes', [None, 1, 100])
def test_rows_at_index_equal_gathered_rows_in_value_and_gradient(monkeypatch, chunk_bytes):
    from nnunet_semiseg.contrast import pixel_contrast
    from nnunet_semiseg.contrast.pixel_contrast import dots_with_rows
    if chunk_bytes is not None:
        monkeypatch.setattr(pixel_contrast, '_CHUNK_BYTES', chunk_bytes)
    g = torch.Generator().manual_seed(4)
    queries = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(500, 5, generator=g, dtype=torch.float64)
    index = torch.randint(0, 500, (6, 9), generator=g)                 # 54 reads < 4 x 500 rows: the row path
    weights = torch.randn(6, 9, generator=g, dtype=torch.float64)
    out = dots_with_rows(queries, table, index)
    (grad,) = torch.autograd.grad((out * weights).sum(), queries)
    plain = queries.detach().clone().requires_grad_(True)
    reference = torch.einsum('qd,qkd->qk', plain, table[index])
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), plain)
    assert torch.allclose(out, reference, rtol=0, atol=1e-12) and torch.allclose(grad, grad_reference, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q: dots_with_rows(q, table, index), (queries.detach().requires_grad_(True),))
