"""A gate for the pseudo-label loss: closed until the teacher segments every foreground class of the labelled data.

Why: the two-stage methods start their pseudo-label loss when a share of the iterations has passed (the papers' 1/3),
which at the papers' 30,000 iterations is long after the teacher has found every class. At nnU-Net's short budgets
it may not have: on real ACDC with 7 labelled patients at 4 x 250 iterations (docs/tuning.md, run 32) fine-tuning
began at iteration 334 while the teacher still predicted no right ventricle, and its confident "background" on the
unlabelled rows (the confidence-weighted CE weighs all their pixels) taught the student the same: RV Dice 0.0 on
every validation frame, where plain nnU-Net reached 59. The gate makes the papers' implicit precondition explicit:
the loss waits until the teacher's Dice on the labelled rows is at least ``threshold`` for every class, and at long
schedules, where that happens during pre-training, it changes nothing.
"""
import torch
from torch import nn


class ClassDiceGate(nn.Module):
    """Tracks a moving average of each foreground class's Dice and opens, for good, once all reach ``threshold``.

    Args:
        num_classes: classes of the label map, background (label 0) included.
        threshold: the Dice every foreground class must reach (moving average).
        momentum: weight of the old average per update (0.9: about the last ten batches).

    Buffers (checkpointed with the trainer's modules): ``dice [C-1]`` (the averages), ``seen [C-1]`` (whether the class
    has been present in a labelled batch), ``is_open`` (scalar bool).
    """

    def __init__(self, num_classes: int, threshold: float = 0.5, momentum: float = 0.9):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2 (background and one class), got {num_classes}')
        if not 0 < threshold <= 1 or not 0 <= momentum < 1:
            raise ValueError(f'need 0 < threshold <= 1 and 0 <= momentum < 1, got {threshold}, {momentum}')
        self.threshold, self.momentum = float(threshold), float(momentum)
        self.register_buffer('dice', torch.zeros(num_classes - 1))
        self.register_buffer('seen', torch.zeros(num_classes - 1, dtype=torch.bool))
        self.register_buffer('is_open', torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> bool:
        """One labelled batch: ``logits [B, C, *spatial]`` (the teacher's), ``target [B, *spatial]`` long, ``-1`` where
        ignored. A class's Dice is taken over the whole batch (its voxels summed over rows) and only when the target
        holds it. Returns whether the gate is open (after this update)."""
        if bool(self.is_open):
            return True
        num_fg = self.dice.numel()
        if logits.shape[1] != num_fg + 1 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f'logits [B, {num_fg + 1}, *sp] and target [B, *sp] expected, got {tuple(logits.shape)} '
                             f'and {tuple(target.shape)}')
        pred = logits.argmax(1)
        valid = target >= 0
        classes = torch.arange(1, num_fg + 1, device=pred.device).view(-1, *([1] * pred.dim()))
        is_pred = (pred.unsqueeze(0) == classes) & valid          # [C-1, B, *sp]
        is_true = target.unsqueeze(0) == classes
        dims = tuple(range(1, is_pred.dim()))
        tp = (is_pred & is_true).sum(dims).float()
        n_true = is_true.sum(dims).float()
        dice = 2 * tp / (is_pred.sum(dims).float() + n_true).clamp_min(1)
        present = n_true > 0
        first = present & ~self.seen
        blended = self.momentum * self.dice + (1 - self.momentum) * dice
        # a class's first measurement starts its average (no pull towards the initial 0)
        self.dice.copy_(torch.where(first, dice, torch.where(present, blended, self.dice)))
        self.seen |= present
        if bool(self.seen.all()) and bool((self.dice >= self.threshold).all()):
            self.is_open.fill_(True)
        return bool(self.is_open)

    def averages(self) -> str:
        """The moving averages as text for the training log, e.g. ``'0.33, 0.72, 0.87'``."""
        return ', '.join(f'{d:.2f}' for d in self.dice.tolist())

    def force_open(self) -> None:
        self.is_open.fill_(True)

    def extra_repr(self) -> str:
        return f'classes={self.dice.numel() + 1}, threshold={self.threshold}, momentum={self.momentum}'
