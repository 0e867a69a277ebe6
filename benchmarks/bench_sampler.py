"""Cost of the NS / SG / SAG anchor samplers at realistic candidate counts, and their analytic variance ratios
on a smooth field.

    python benchmarks/bench_sampler.py            # CPU (+ CUDA if available), about a minute on CPU
    python benchmarks/bench_sampler.py --quick    # a few seconds
    python benchmarks/bench_sampler.py --threads 1 --device cpu

Times are the median over repeats of one ``sample(mask, n, mode)`` call (stratification included), in ms.
Masks are thresholded smooth random fields (blob-shaped class masks) with the stated candidate fraction."""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nnunet_semiseg.sampling import MODES, analytic_variance, sample


def smooth_field(shape, generator, cells=8):
    """Low-frequency random field of ``shape`` ``[B, *spatial]``: ``cells``-per-axis noise, upsampled."""
    B, *spatial = shape
    coarse = torch.randn(B, 1, *[cells] * len(spatial), generator=generator)
    mode = 'bilinear' if len(spatial) == 2 else 'trilinear'
    return F.interpolate(coarse, size=spatial, mode=mode, align_corners=False)[:, 0]


def blob_mask(shape, fraction, generator):
    """Bool mask with about ``fraction`` candidates: the top quantile of a smooth field."""
    field = smooth_field(shape, generator)
    threshold = torch.quantile(field.reshape(-1)[::97], 1 - fraction)
    return field > threshold


def time_call(fn, repeats, device):
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='2D masks and n = 256 only, few repeats')
    parser.add_argument('--device', choices=['cpu', 'cuda', 'all'], default='all',
                        help='cpu, cuda, or all available (default)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s)')
    parser.add_argument('--repeats', type=int, default=None, help='timed calls per entry (default 5, quick 3)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    devices = []
    if args.device in ('cpu', 'all'):
        devices.append(torch.device('cpu'))
    if args.device in ('cuda', 'all') and torch.cuda.is_available():
        devices.append(torch.device('cuda'))
    if args.device == 'cuda' and not devices:
        raise SystemExit('CUDA requested but not available')

    g = torch.Generator().manual_seed(0)
    cases = [((8, 256, 256), 0.1), ((8, 256, 256), 0.5)]
    if not args.quick:
        cases += [((2, 64, 128, 128), 0.1), ((2, 64, 128, 128), 0.5)]
    draws = [256] if args.quick else [256, 256 * 512]
    masks = {(shape, frac): blob_mask(shape, frac, g) for shape, frac in cases}

    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats} (median ms per call)')
    header = '| device | mask | candidates | n | ' + ' | '.join(f'{m} ms' for m in MODES) + ' |'
    print(header)
    print('|' + '---|' * (4 + len(MODES)))
    for device in devices:
        gen = torch.Generator(device=device).manual_seed(1)
        for (shape, frac), mask in masks.items():
            mask_d = mask.to(device)
            for n in draws:
                cost = [time_call(lambda: sample(mask_d, n, mode, generator=gen), repeats, device)
                        for mode in MODES]
                label = 'x'.join(map(str, shape))
                print(f'| {device.type} | {label} ~{frac:.0%} | {int(mask.sum()):,} | {n:,} | '
                      + ' | '.join(f'{c:.2f}' for c in cost) + ' |')

    print('\nAnalytic variance of the mean estimate of a smooth field h over the mask (n = 256, default grid):')
    print('| mask | Var NS | Var SG | Var SAG | SG/NS | SAG/SG |')
    print('|---|---|---|---|---|---|')
    for (shape, frac), mask in masks.items():
        h = smooth_field(shape, g, cells=4).double()
        v = {mode: analytic_variance(h, mask, 256, mode) for mode in MODES}
        label = 'x'.join(map(str, shape))
        print(f'| {label} ~{frac:.0%} | {v["naive"]:.3e} | {v["sg"]:.3e} | {v["sag"]:.3e} | '
              f'{v["sg"] / v["naive"]:.3f} | {v["sag"] / v["sg"]:.3f} |')


if __name__ == '__main__':
    main()
