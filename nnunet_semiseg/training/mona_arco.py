"""MONA (You et al., TPAMI 2024) and ARCO (You et al., NeurIPS 2023) for nnU-Net: relational pre-training, then
pixel/voxel contrast whose anchors and negatives are drawn naively (MONA) or with ARCO's stratified (SG) or
stratified-antithetic (SAG) sampling. The pipeline lives in nnunet_semiseg.training.contrastive; these classes
choose the sampler, and ARCO leaves out MONA's equivariance term, which the ARCO paper does not have and which cost
4.5 Dice on the ACDC validation patients (docs/tuning.md, run 18). Any sampler works with any of our contrastive
trainers: set ``self.sampler`` in a subclass (docs/mona_arco.md)."""
import torch

from nnunet_semiseg.training.contrastive import PixelContrastMethod


class nnUNetTrainerMONA(PixelContrastMethod):
    """MONA = the pipeline with naive (uniform, with replacement) sampling."""


class nnUNetTrainerARCO_SG(PixelContrastMethod):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sampler = 'sg'
        self.lambda_equivariance = 0.0  # MONA's released 2D term, not ARCO's: docs/mona_arco.md, "Equivariance"


class nnUNetTrainerARCO_SAG(PixelContrastMethod):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sampler = 'sag'
        self.lambda_equivariance = 0.0  # as ARCO_SG
