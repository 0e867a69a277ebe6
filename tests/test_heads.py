"""Projection heads (spec arco_mona.md §2): shapes for 2D and 3D nnU-Net-like decoder taps, gradients."""
import pytest
import torch
from torch import nn

from nnunet_semiseg.heads import DEFAULT_OUTPUT_LEVEL, DEFAULT_REP_DIM, EmbeddingHead, FPNProjectionHead, Predictor

CHANNELS = [256, 128, 64, 32]          # decoder taps at 1/8, 1/4, 1/2, 1/1 (coarse -> fine)


def decoder_features(batch, full, channels=CHANNELS, requires_grad=True):
    """Maps [B, C_l, *spatial_l] with spatial_l = full / 2^(L-1-l) per axis."""
    n = len(channels)
    return [torch.randn(batch, c, *[s // 2 ** (n - 1 - l) for s in full], requires_grad=requires_grad)
            for l, c in enumerate(channels)]


def test_fpn_head_2d_shape_at_half_resolution_and_gradient_to_every_level():
    feats = decoder_features(2, (32, 32))
    head = FPNProjectionHead(nn.Conv2d, CHANNELS, DEFAULT_REP_DIM[2], output_level=DEFAULT_OUTPUT_LEVEL[2])
    out = head(feats)
    assert out.shape == (2, 128, 16, 16)                 # 1/2 of the finest map, D = 128
    out.square().mean().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)  # finest level is pooled in
    assert all(p.grad is not None for p in head.parameters())


def test_fpn_head_3d_anisotropic_shape_at_quarter_resolution():
    channels = [320, 256, 128, 64, 32]
    sizes = [(2, 4, 4), (4, 8, 8), (8, 16, 16), (8, 32, 32), (16, 64, 64)]   # nnU-Net-like (1,2,2) stride
    feats = [torch.randn(1, c, *s) for c, s in zip(channels, sizes)]
    head = FPNProjectionHead(nn.Conv3d, channels, DEFAULT_REP_DIM[3], output_level=DEFAULT_OUTPUT_LEVEL[3])
    assert head(feats).shape == (1, 64, 8, 16, 16)


def test_fpn_head_full_resolution_and_nonlinear_and_errors():
    feats = decoder_features(1, (16, 16), requires_grad=False)
    head = FPNProjectionHead(nn.Conv2d, CHANNELS, 16, output_level=-1, nonlinear=True)
    assert head(feats).shape == (1, 16, 16, 16)
    single = FPNProjectionHead(nn.Conv2d, [8], 4, output_level=0)
    assert single([torch.randn(2, 8, 5, 5)]).shape == (2, 4, 5, 5)
    with pytest.raises(ValueError, match='output_level'):
        FPNProjectionHead(nn.Conv2d, CHANNELS, 16, output_level=4)
    with pytest.raises(ValueError, match='in_channels'):
        FPNProjectionHead(nn.Conv2d, [], 16)
    with pytest.raises(ValueError, match='channels'):
        head(feats[:-1] + [torch.randn(1, 31, 16, 16)])


def test_predictor_and_embedding_head_shapes_2d_3d():
    for conv, shape in ((nn.Conv2d, (2, 32, 8, 8)), (nn.Conv3d, (2, 32, 4, 8, 8)), (nn.Linear, (2, 32))):
        pred = Predictor(conv, 32)
        x = torch.randn(*shape, requires_grad=True)
        y = pred(x)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.abs().sum() > 0
        assert all(m.bias is None for m in pred.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)))
    emb = EmbeddingHead(64, 512, nonlinear=True)
    assert emb(torch.randn(3, 64, 8, 8)).shape == (3, 512)
    assert emb(torch.randn(3, 64, 4, 8, 8)).shape == (3, 512)
    assert emb(torch.randn(3, 64)).shape == (3, 512)
    x = torch.randn(3, 64, 4, 4, 4)
    # global average pooling: a spatially constant map gives the same embedding as its pooled vector
    assert torch.allclose(emb(x.mean((2, 3, 4), keepdim=True).expand_as(x)), emb(x.mean((2, 3, 4))), atol=1e-6)
    with pytest.raises(ValueError, match='EmbeddingHead'):
        emb(torch.randn(3, 32, 4, 4))


def test_take_detached_hands_over_a_fresh_map_and_never_a_shared_one():
    """The anatomical contrast normalises a map it owns in place; one that ``detached()`` already handed out (or a
    view of the dense map) is not owned and stays as it was."""
    from nnunet_semiseg.contrast.anatomical import AnatomicalContrastLoss
    g = torch.Generator().manual_seed(0)
    head = FPNProjectionHead(nn.Conv2d, [8, 4], 6, output_level=-1)
    feats = [torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 4, 8, 8, generator=g)]
    fresh, owned = head.represent(feats).take_detached()
    assert owned and torch.allclose(fresh, head(feats).detach())
    reps = head.represent(feats)
    shared = reps.detached()
    before = shared.clone()
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    probs = torch.rand(2, 3, 8, 8, generator=g).softmax(1)
    value = AnatomicalContrastLoss(num_queries=4, num_negatives=5)(reps, labels, probs, generator=g)
    assert torch.isfinite(value) and reps.take_detached()[1] is False and torch.equal(reps.detached(), before)
