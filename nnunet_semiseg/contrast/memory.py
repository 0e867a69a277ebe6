"""A fixed-size FIFO queue of feature vectors (and optional integer labels), kept as module buffers so that it
moves with ``.to(device)`` and is saved in a ``state_dict`` (restored by ``--c``)."""
import torch
from torch import nn


class FeatureQueue(nn.Module):
    """Ring buffer of ``size`` vectors of dimension ``dim``.

    Unlike the authors' queues it has no ``size % batch == 0`` constraint (writes wrap around) and it never
    hands out entries that were not written yet (no random initial keys: ``get()`` returns only the filled
    part).

    Args:
        size: number of entries kept (> 0).
        dim: feature dimension (> 0).
        with_labels: also keep one ``long`` label per entry.

    Rows that are not finite (a teacher forward that overflowed in half precision) are never written: one NaN row
    would make every later loss that reads the queue NaN, and the trainers keep what a skipped step pushed.

    Buffers: ``feats [size, dim] float``, ``labels [size] long`` (-1 = empty), ``ptr`` and ``count`` (long scalars).
    """

    def __init__(self, size: int, dim: int, with_labels: bool = False):
        super().__init__()
        if size <= 0:
            raise ValueError(f'FeatureQueue size must be > 0, got {size}')
        if dim <= 0:
            raise ValueError(f'FeatureQueue dim must be > 0, got {dim}')
        self.size, self.dim, self.with_labels = int(size), int(dim), bool(with_labels)
        self.register_buffer('feats', torch.zeros(self.size, self.dim))
        self.register_buffer('labels', torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.long))
        self.register_buffer('count', torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @property
    def full(self) -> bool:
        return int(self.count) == self.size

    @torch.no_grad()
    def push(self, feats: torch.Tensor, labels: torch.Tensor = None) -> None:
        """Append ``feats [N, dim]`` (and ``labels [N]``), overwriting the oldest entries; detached. Non-finite rows
        are left out."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f'FeatureQueue.push expects [N, {self.dim}] features, got {tuple(feats.shape)}')
        if self.with_labels and (labels is None or labels.shape != feats.shape[:1]):
            raise ValueError('FeatureQueue(with_labels=True).push needs labels of shape [N]')
        finite = torch.isfinite(feats).all(1)
        if not bool(finite.all()):
            feats = feats[finite]
            labels = labels[finite] if labels is not None else None
        n = feats.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest `size` survive
            feats = feats[-self.size:]
            labels = labels[-self.size:] if labels is not None else None
            n = self.size
        idx = (int(self.ptr) + torch.arange(n, device=self.feats.device)) % self.size
        self.feats[idx] = feats.detach().to(self.feats.dtype)
        if self.with_labels:
            self.labels[idx] = labels.detach().to(torch.long)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(self.size, int(self.count) + n))

    def get(self):
        """The filled entries, oldest first: ``feats [M, dim]`` (and ``labels [M]`` if kept), ``M = len(self)``."""
        m = int(self.count)
        if m < self.size:
            order = torch.arange(m, device=self.feats.device)
        else:
            order = (int(self.ptr) + torch.arange(self.size, device=self.feats.device)) % self.size
        if self.with_labels:
            return self.feats[order], self.labels[order]
        return self.feats[order]
