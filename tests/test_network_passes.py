"""benchmarks/network_passes.py: the median of the timed passes, warm-up passes untimed (a fake clock, no timing)."""


def test_median_of_timed_passes_ignores_warmup(load_script, monkeypatch):
    np_ = load_script('benchmarks/network_passes.py')
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 9.0, 5.0])   # two warm-up passes, then five timed ones
    clock = {'t': 0.0, 'calls': 0}

    def fn():
        clock['calls'] += 1
        clock['t'] += next(durations)

    monkeypatch.setattr(np_.time, 'perf_counter', lambda: clock['t'])
    assert np_._median_seconds(fn, warmup=2, repeats=5) == 3.0   # sorted 1, 2, 3, 5, 9
    assert clock['calls'] == 7
