"""The pseudo-label loss's ramp over fine-tuning (``unsup_rampup_fraction``): off by default (the papers' constant
weight), a sigmoid over a share of the fine-tuning phase when set, so one setting serves any schedule length."""
import math
from types import SimpleNamespace

import pytest

from nnunet_semiseg.training.contrastive import nnUNetTrainerContrastiveBase


def weight(step, length, fraction, lam=1.0):
    state = SimpleNamespace(finetune_progress=(step, length), lambda_unsup=lam, unsup_rampup_fraction=fraction,
                            unsup_gate_open=lambda: True)
    return nnUNetTrainerContrastiveBase.current_lambda_unsup(state)


def test_default_is_the_papers_constant_weight():
    assert weight(0, 667, 0.0) == 1.0 and weight(500, 667, 0.0, lam=2.0) == 2.0


@pytest.mark.parametrize('length', [667, 166_667])   # 4 x 250 and 1000 x 250 iterations, 1/3 pre-training
def test_ramp_scales_with_the_fine_tuning_length(length):
    ramp = 0.3 * length
    assert weight(0, length, 0.3) == pytest.approx(math.exp(-5))
    assert weight(ramp / 2, length, 0.3) == pytest.approx(math.exp(-5 * 0.25))
    assert weight(ramp, length, 0.3) == 1.0 and weight(length, length, 0.3, lam=0.5) == 0.5
