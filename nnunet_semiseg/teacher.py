"""EMA teacher: an exponential moving average of the student, built on torch's own
``torch.optim.swa_utils.AveragedModel`` (design §7) with ``use_buffers=True`` so normalisation statistics follow
the student too.

Update rule after every optimiser step (Tarvainen & Valpola 2017)::

    theta_teacher <- d * theta_teacher + (1 - d) * theta_student,   d = min(decay, 1 - 1 / (n + 1))

where ``n`` counts the updates so far. The ``1 - 1/(n+1)`` warm-up (the Mean Teacher paper's) makes the early
teacher the plain average of the first students instead of a frozen random init; with ``warmup=False`` ``d`` is
``decay`` from the first step, as in the MONA/ARCO/ACTION code. Integer buffers are copied, not averaged.
"""
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _ema_multi_avg_fn(decay: float, warmup: bool):
    @torch.no_grad()
    def update(ema_params, current_params, num_averaged):
        d = decay
        if warmup:
            d = min(decay, 1.0 - 1.0 / (float(num_averaged) + 1.0))
        if ema_params[0].dtype.is_floating_point:
            torch._foreach_lerp_(ema_params, current_params, 1.0 - d)
        else:  # e.g. BatchNorm's num_batches_tracked
            for e, c in zip(ema_params, current_params):
                e.copy_(c)
    return update


class EMATeacher(nn.Module):
    """An EMA copy of ``student`` with no gradients, always in eval mode.

    Args:
        student: the module to average (any ``nn.Module``; for nnU-Net the unwrapped network, or a
            ``ModuleDict`` bundling it with projection heads).
        decay: EMA decay ``d`` in [0, 1) (default 0.99, the value of all four papers' code).
        warmup: use ``min(decay, 1 - 1/(n+1))`` (Mean Teacher); False: constant ``decay``.

    Raises ``ValueError`` for a decay outside [0, 1).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f'EMA decay must be in [0, 1), got {decay}')
        self.decay, self.warmup = float(decay), bool(warmup)
        self.averaged = AveragedModel(student, multi_avg_fn=_ema_multi_avg_fn(self.decay, self.warmup),
                                      use_buffers=True)
        self.averaged.module.requires_grad_(False)
        self.averaged.update_parameters(student)  # n_averaged = 1: an exact copy to start from
        self.train(False)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the student (same class and state_dict keys as the student)."""
        return self.averaged.module

    def train(self, mode: bool = True):
        # the teacher never trains: InstanceNorm/BatchNorm in eval mode, no dropout
        return super().train(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (same architecture as the one given at construction)."""
        self.averaged.update_parameters(student)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Hard re-sync ``teacher <- student`` (after DDP's broadcast or ``-pretrained_weights``); keeps the
        update counter."""
        for t, s in zip(list(self.module.parameters()) + list(self.module.buffers()),
                        list(student.parameters()) + list(student.buffers())):
            t.copy_(s.detach())

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.averaged.module(*args, **kwargs)

    @property
    def num_updates(self) -> int:
        return int(self.averaged.n_averaged)

