"""Class centres (ACTION++ §3.2) and the cosine temperature schedule (ATS, §3.5);
spec ``action.md`` §7 items 1-2 and 10."""
import math

import pytest
import torch

from nnunet_semiseg.centres import simplex_cosine, uniform_centres, uniformity_loss
from nnunet_semiseg.schedules import cosine_tau, linear_rampup, sigmoid_rampup


def _offdiag_cos(psi):
    cos = psi.double() @ psi.double().T
    return cos[~torch.eye(psi.shape[0], dtype=torch.bool)]


# ------------------------------------------------------------------------------------------------ centres

@pytest.mark.parametrize('k,d', [(2, 128), (4, 128), (4, 496), (4, 3), (5, 4), (8, 128)])
def test_simplex_is_exact(k, d):
    psi = uniform_centres(k, d, torch.Generator().manual_seed(0))
    assert psi.shape == (k, d) and psi.dtype == torch.float32
    assert torch.allclose(psi.double().norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(_offdiag_cos(psi), torch.full((k * (k - 1),), -1 / (k - 1), dtype=torch.float64), atol=1e-6)
    assert psi.double().sum(0).norm() < 1e-6
    # 180 deg for K=2, 109.47 deg for K=4; a cosine error of 1e-6 moves the angle by up to sqrt(2e-6) rad = 0.081 deg
    # at the antipode (acos is ill-conditioned there), so the angle is checked to 0.1 deg
    min_angle = math.degrees(math.acos(max(-1.0, _offdiag_cos(psi).max().item())))
    assert min_angle == pytest.approx(math.degrees(math.acos(-1 / (k - 1))), abs=0.1)


def test_simplex_uniformity_loss_value_and_optimality():
    tau = 0.07
    expected = math.log(math.exp(1 / tau) + 3 * math.exp(-1 / (3 * tau)))
    assert expected == pytest.approx(14.285714, abs=1e-6)
    psi = uniform_centres(4, 128, torch.Generator().manual_seed(1))
    # float32: 14.29 is represented to ~1e-6; the exponentials add a few ulp
    assert uniformity_loss(psi, tau).item() == pytest.approx(expected, abs=1e-5)
    assert uniformity_loss(psi.double(), tau).item() == pytest.approx(expected, abs=1e-9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        random_centres = torch.randn(4, 128, generator=generator, dtype=torch.float64)
        assert uniformity_loss(random_centres, tau).item() >= expected
        assert uniformity_loss(random_centres, tau, include_self=False).item() > \
            uniformity_loss(psi.double(), tau, include_self=False).item()


def test_centres_are_seeded_and_rotated():
    a = uniform_centres(4, 128, torch.Generator().manual_seed(3))
    b = uniform_centres(4, 128, torch.Generator().manual_seed(3))
    c = uniform_centres(4, 128, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    assert torch.allclose(_offdiag_cos(c), torch.full((12,), -1 / 3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize('k,d', [(2, 128), (4, 128)])
def test_optimiser_without_self_term_reaches_the_simplex(k, d):
    psi = uniform_centres(k, d, torch.Generator().manual_seed(0), method='optimise')
    assert (_offdiag_cos(psi) - simplex_cosine(k)).abs().max() < 1e-4


# Cohn & Kumar (2007): the octahedron, the cross-polytope and the icosahedron are universally optimal, so they
# minimise the uniformity energy exp(<x, y>/tau) for every tau; their largest pairwise cosine is 0, 0 and 1/sqrt(5).
@pytest.mark.parametrize('k,d,optimum', [(6, 3, 0.0), (8, 4, 0.0), (12, 3, 1 / math.sqrt(5))])
def test_more_classes_than_a_simplex_allows_known_optima(k, d, optimum):
    psi = uniform_centres(k, d, torch.Generator().manual_seed(0))
    assert torch.allclose(psi.double().norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    assert _offdiag_cos(psi).max().item() == pytest.approx(optimum, abs=1e-3)


def test_more_classes_than_a_simplex_allows_well_spread():
    # Tammes' optimum for 20 points on S^2 is a minimum angle of 47.43 deg (max cos 0.6765); 20 random points have a
    # max cos around 0.95. Require within 0.085 of the optimum (energy minimisers are not exact Tammes solutions).
    psi = uniform_centres(20, 3, torch.Generator().manual_seed(0))
    assert _offdiag_cos(psi).max().item() < 0.6765 + 0.085


def test_centre_argument_validation():
    with pytest.raises(ValueError, match='num_classes'):
        uniform_centres(1, 8)
    with pytest.raises(ValueError, match='dim'):
        uniform_centres(3, 0)
    with pytest.raises(ValueError, match='method'):
        uniform_centres(3, 8, method='official')
    with pytest.raises(ValueError, match='dim >= 5'):
        uniform_centres(6, 3, method='simplex')
    with pytest.raises(ValueError, match='tau'):
        uniformity_loss(torch.randn(3, 4), 0.0)


# ------------------------------------------------------------------------------------------------ cosine tau

def test_cosine_tau_landmarks():
    total = 1000
    assert cosine_tau(0, total, 0.1, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert cosine_tau(total / 4, total, 0.1, 1.0) == pytest.approx(0.55, abs=1e-12)
    assert cosine_tau(total / 2, total, 0.1, 1.0) == pytest.approx(0.1, abs=1e-12)
    assert cosine_tau(3 * total / 4, total, 0.1, 1.0) == pytest.approx(0.55, abs=1e-12)
    assert cosine_tau(total, total, 0.1, 1.0) == pytest.approx(1.0, abs=1e-12)


def test_cosine_tau_bounded_and_monotone():
    total = 400
    values = [cosine_tau(t, total, 0.07, 1.0) for t in range(total + 1)]
    assert all(0.07 - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    first_half = values[:total // 2 + 1]
    assert all(a > b for a, b in zip(first_half, first_half[1:]))          # strictly decreasing on [0, T/2]
    second_half = values[total // 2:]
    assert all(a < b for a, b in zip(second_half, second_half[1:]))        # increasing on [T/2, T]


def test_cosine_tau_period_fraction():
    total, fraction = 1000, 0.1
    period = fraction * total
    for t in (0, 13, 50, 77.5):
        for cycle in (1, 3, 9):
            assert cosine_tau(t + cycle * period, total, 0.1, 1.0, fraction) == pytest.approx(
                cosine_tau(t, total, 0.1, 1.0, fraction), abs=1e-12)
    assert cosine_tau(period / 2, total, 0.1, 1.0, fraction) == pytest.approx(0.1, abs=1e-12)


def test_cosine_tau_validation():
    with pytest.raises(ValueError, match='total_steps'):
        cosine_tau(0, 0, 0.1, 1.0)
    with pytest.raises(ValueError, match='tau_min'):
        cosine_tau(0, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match='tau_min'):
        cosine_tau(0, 10, 0.0, 0.1)
    with pytest.raises(ValueError, match='period_fraction'):
        cosine_tau(0, 10, 0.1, 1.0, 0)
    with pytest.raises(ValueError, match='step'):
        cosine_tau(-1, 10, 0.1, 1.0)


def test_existing_ramps_unchanged():
    assert sigmoid_rampup(0, 0) == 1.0 and linear_rampup(5, 10) == 0.5
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
