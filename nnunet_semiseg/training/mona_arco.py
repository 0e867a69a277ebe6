"""MONA (You et al., TPAMI 2024) and ARCO (You et al., NeurIPS 2023) for nnU-Net: relational pre-training, then
pixel/voxel contrast whose anchors and negatives are drawn naively (MONA) or with ARCO's stratified (SG) or
stratified-antithetic (SAG) sampling. The pipeline lives in nnunet_semiseg.training.contrastive; these classes only
choose the sampler. Any sampler works with any of our contrastive trainers: set ``self.sampler`` in a subclass
(docs/mona_arco.md)."""
import torch

from nnunet_semiseg.training.contrastive import PixelContrastMethod


class nnUNetTrainerMONA(PixelContrastMethod):
    """MONA = the pipeline with naive (uniform, with replacement) sampling."""


class nnUNetTrainerARCO_SG(PixelContrastMethod):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sampler = 'sg'


class nnUNetTrainerARCO_SAG(PixelContrastMethod):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sampler = 'sag'
