"""No-teach controls: plain nnU-Net whose initial weights are perturbed by a rounding-sized amount.

A paired difference to plain nnU-Net (same seed, same initial weights, same labelled batches) measures what a
method changes, but a 2,000-step run carries even a change that teaches nothing a long way: on real ACDC a 1e-6
jitter of plain's initial weights moved a 4 x 500 run by 4.4 Dice (docs/tuning.md run 78). A control's difference
to plain is therefore the yardstick for every other trainer's, and ``nnunet-semiseg benchmark --controls N`` trains
``nnUNetTrainer_jitter1`` to ``_jitterN`` beside the trainers (docs/benchmarking.md, "How far nothing moves a run").
"""
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def jitter_(module: nn.Module, relative: float, generator: torch.Generator) -> None:
    """Scale every parameter of ``module`` in place by ``1 + relative * N(0, 1)``, one draw per element.

    The draws come from ``generator`` on the CPU in ``module.parameters()`` order and are then moved to each
    parameter's device, so one generator seed gives the same perturbation on every device. Zero entries (nnU-Net's
    norm biases at initialisation) stay zero."""
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.mul_((1 + relative * noise).to(device=p.device, dtype=p.dtype))


class nnUNetTrainer_jitter1(nnUNetTrainer):
    """Plain nnU-Net with its initial weights scaled by ``1 + 1e-6 N(0, 1)`` from a generator of its own (seed
    ``jitter_seed``), so the data stream and every other draw stay plain's at the same seed: a perturbation without
    a direction. ``_jitter2`` and ``_jitter3`` draw other perturbations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.jitter_seed = 1
        self.relative_jitter = 1e-6

    def initialize(self):
        fresh = not self.was_initialized
        super().initialize()
        if fresh:  # a continued run loads its checkpoint over these weights afterwards
            jitter_(self.network, self.relative_jitter, torch.Generator().manual_seed(self.jitter_seed))


class nnUNetTrainer_jitter2(nnUNetTrainer_jitter1):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.jitter_seed = 2


class nnUNetTrainer_jitter3(nnUNetTrainer_jitter1):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.jitter_seed = 3
