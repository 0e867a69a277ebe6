"""benchmarks/rep_collapse.py: the collapse figures on hand-built representation vectors."""
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope='module')
def rep_collapse(load_script):
    return load_script('benchmarks/rep_collapse.py')


def test_collapsed_vectors_read_as_collapsed(rep_collapse):
    # every position the same direction (a bias-free linear head of non-negative features can end there)
    vectors = F.normalize(torch.ones(500, 8) + 1e-4 * torch.randn(500, 8, generator=torch.Generator().manual_seed(0)),
                          dim=1)
    labels = torch.arange(500) % 3
    s = rep_collapse.stats(vectors, labels, torch.Generator().manual_seed(1))
    assert s['mean_cos'] == pytest.approx(1.0, abs=1e-4) and s['p01_cos'] == pytest.approx(1.0, abs=1e-4)
    assert s['top_direction_share'] == pytest.approx(1.0, abs=1e-4)
    assert s['same_class_cos'] == pytest.approx(s['other_class_cos'], abs=1e-4)


def test_class_separated_vectors_read_as_separated(rep_collapse):
    # three classes on three orthogonal axes: same class cos 1, other classes 0; second moment split in thirds
    labels = torch.arange(600) % 3
    vectors = F.one_hot(labels, 8).float()
    s = rep_collapse.stats(vectors, labels, torch.Generator().manual_seed(1))
    assert s['same_class_cos'] == pytest.approx(1.0) and s['other_class_cos'] == pytest.approx(0.0)
    assert s['top_direction_share'] == pytest.approx(1 / 3, abs=1e-4)   # rounded to 4 places
    assert s['mean_cos'] == pytest.approx(1 / 3, abs=0.02)   # a third of random pairs share a class
    assert s['p01_cos'] == 0.0
