"""Trainer variants for the real-ACDC tuning log (docs/tuning.md); one change each."""
from nnunet_semiseg.training.mona_arco import nnUNetTrainerARCO_SAG


class nnUNetTrainerARCO_SAG_noEqv(nnUNetTrainerARCO_SAG):
    """ARCO_SAG without MONA's equivariance term (not in the ARCO paper; issue 10 allows it as ARCO's default if it
    costs no accuracy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lambda_equivariance = 0.0
