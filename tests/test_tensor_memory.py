"""benchmarks/tensor_memory.py: the CPU's peak tensor memory, checked on allocations of known size."""
import pytest
import torch

MB = 2 ** 20


@pytest.fixture(scope='module')
def tm(load_script):
    return load_script('benchmarks/tensor_memory.py')


def test_running_peak_takes_events_in_time_order_frees_first_at_ties(tm):
    # allocate 10 at t=1, 20 at t=3, free 10 at t=2, then at t=4 free 5 and allocate 5 together
    events = [(3, 20), (1, 10), (2, -10), (4, 5), (4, -5)]
    assert tm.running_peak(events) == 20
    assert tm.running_peak([(1, 10), (2, 20), (3, -10), (4, 5)]) == 30
    assert tm.running_peak([]) == 0


def test_peak_of_a_call_with_known_allocations(tm):
    def call():
        a = torch.zeros(10 * MB // 4)
        b = torch.zeros(20 * MB // 4)
        del a
        c = torch.zeros(5 * MB // 4)      # lands below the peak of a + b
        return b.sum() + c.sum()

    assert tm.peak_above_start(call) == pytest.approx(30 * MB, abs=64 * 1024)


def test_live_tensors_count_a_shared_storage_once(tm):
    before = tm.live_tensor_bytes()
    x = torch.zeros(8 * MB // 4)
    views = [x[:10], x.view(2, -1), x.data]          # same storage, no new bytes
    assert tm.live_tensor_bytes() - before == pytest.approx(8 * MB, abs=64 * 1024)
    del x, views
    assert tm.live_tensor_bytes() - before == pytest.approx(0, abs=64 * 1024)


def test_peak_tensor_bytes_adds_what_was_alive(tm):
    keep = torch.zeros(4 * MB // 4)
    alive = tm.live_tensor_bytes()
    peak = tm.peak_tensor_bytes(lambda: torch.zeros(6 * MB // 4).sum())
    assert peak - alive == pytest.approx(6 * MB, abs=64 * 1024)
    assert keep.numel() == MB


def test_repeat_measures_the_second_call_whose_frees_are_all_seen(tm):
    state = {'last': torch.zeros(16 * MB // 4)}        # allocated before the profiler: its free is invisible

    def step():
        state['last'] = None                           # drops the previous step's 16 MB
        state['last'] = torch.zeros(16 * MB // 4)      # and allocates its own

    # one call alone cannot see the free: it reads +16 MB; the second of two sees the first call's block go
    assert tm.peak_above_start(step) == pytest.approx(16 * MB, abs=64 * 1024)
    assert tm.peak_above_start(step, repeat=True) == pytest.approx(0, abs=64 * 1024)


def test_memory_parts_levels_and_the_part_holding_the_peak(load_script):
    parts = load_script('benchmarks/memory_parts.py')

    class Event:
        def __init__(self, name, start, end=None, nbytes=0):
            self._n, self._s, self._e, self._b = name, start, end if end is not None else start, nbytes

        def name(self):
            return self._n

        def start_ns(self):
            return self._s

        def end_ns(self):
            return self._e

        def nbytes(self):
            return self._b

        def device_type(self):
            return torch._C._autograd.DeviceType.CPU

    events = [Event(parts.PART + 'forward', 10, 20), Event(parts.PART + 'loss', 30, 40),
              Event('[memory]', 11, nbytes=100), Event('[memory]', 12, nbytes=50), Event('[memory]', 15, nbytes=-50),
              Event('[memory]', 31, nbytes=80), Event('[memory]', 35, nbytes=-80),
              Event('[memory]', 5, nbytes=999)]                                   # before the step: not counted
    (peak_time, peak), rows = parts.part_levels(events, 10, 40)
    assert (peak_time, peak) == (31, 180)
    assert rows == [('forward', 0, 100, 150, False), ('loss', 100, 100, 180, True)]
