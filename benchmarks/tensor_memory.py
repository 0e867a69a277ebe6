"""Peak tensor memory on the CPU: the counterpart of ``torch.cuda.max_memory_allocated`` for machines without a GPU.

A process' resident set size mixes tensors with a gigabyte of libraries and the allocator's cache, so its multiples
understate what a GPU sees, where only tensors count. Here the tensors alone are counted: the bytes held by every
tensor alive when a call starts (parameters, gradients, optimizer state, teacher, banks, the batch) plus the highest
point the call's own allocations reach above that, read from the profiler's allocation and free events in time order.
The profiler cannot size a free of memory allocated before it started, so a call that frees what came before it (a
training step drops the last step's gradients and features) is measured as the second of two calls under one
profiler: what the second frees, the first allocated. The ratio between trainers is what transfers to a GPU (there,
mixed precision shrinks the activations of every trainer alike).

    from tensor_memory import peak_tensor_bytes
    peak = peak_tensor_bytes(lambda: trainer.train_step(batch), repeat=True)   # a step after a step
"""
import gc
import warnings
from typing import Callable, Iterable, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages behind every tensor the garbage collector tracks (a storage shared by
    views or by a parameter and its ``.data`` counts once)."""
    storages = {}
    with warnings.catch_warnings():   # isinstance() on some lazily deprecated torch objects warns
        warnings.simplefilter('ignore')
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != 'cpu' or obj.is_sparse:
                continue
            storage = obj.untyped_storage()
        except Exception:        # tensor subclasses without a storage (fake, functional wrappers)
            continue
        if storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def running_peak(events: Iterable[Tuple[int, int]]) -> int:
    """Highest running sum of ``(time_ns, bytes)`` allocation (+) and free (-) events taken in time order; at equal
    times frees count first, so a peak is never inflated by reordering."""
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


_MARK = 'tensor_memory.measured'


def profile_call(fn: Callable[[], object], repeat: bool = False):
    """Run ``fn()`` under the CPU profiler with allocation events: ``(live, events, begin, end)``, the tensor bytes
    alive when the measured call began, the profiler's events, and the measured call's span (ns). With ``repeat``
    the call runs twice under one profiler and the second is measured."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if repeat:
            fn()
        gc.collect()
        live = live_tensor_bytes()
        with record_function(_MARK):
            fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # a private interface of torch.profiler; say which torch lacks it
        raise RuntimeError(f'torch {torch.__version__}: the profiler exposes no allocation events '
                           f'(profiler.kineto_results); peak tensor memory cannot be measured on this version') from e
    mark = next(e for e in events if e.name() == _MARK)
    return live, events, mark.start_ns(), mark.end_ns()


def allocations(events, begin: int, end: int):
    """``(time_ns, bytes)`` of the CPU allocation (+) and free (-) events between ``begin`` and ``end``, in time order
    (frees first at equal times)."""
    cpu = torch._C._autograd.DeviceType.CPU
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == '[memory]' and e.device_type() == cpu and begin <= e.start_ns() <= end)


def _peak_of_measured(fn: Callable[[], object], repeat: bool):
    live, events, begin, end = profile_call(fn, repeat)
    return live, running_peak(allocations(events, begin, end))


def peak_above_start(fn: Callable[[], object], repeat: bool = False) -> int:
    """Bytes the CPU allocations of ``fn()`` reach at their highest above what was allocated when it began."""
    return _peak_of_measured(fn, repeat)[1]


def peak_tensor_bytes(fn: Callable[[], object], repeat: bool = False) -> int:
    """Tensors alive before ``fn()`` plus the peak of its own allocations above them, in bytes (``repeat``: of the
    second of two calls)."""
    live, peak = _peak_of_measured(fn, repeat)
    return live + peak
