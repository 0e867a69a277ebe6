"""The floor under a semi-supervised step's cost: the planned network's forward + backward at the plans' batch size
and at twice it (a student over labelled + unlabelled rows), and its no-grad forward (an EMA teacher), on the
device, float32. A two-stage trainer's step cannot cost less than its network passes, whatever its heads and terms
cost, so dividing its passes by plain's forward + backward gives the lowest multiple of plain it can reach without
changing the method (docs/benchmarks.md, "The network passes alone set the floor")::

    python benchmarks/network_passes.py -d 27 -c 2d -p nnUNetPlans_cpu

Each figure is the median of ``--repeats`` passes after ``--warmup``; ``--rounds`` repeats the whole list, since a
shared or throttled CPU drifts between rounds. The rows ``2 x batch`` run twice the plans' batch as two passes of the
batch each (the trainers' ``rows_per_pass`` default on the CPU): the student's two graphs kept for one backward, the
teacher's two no-grad passes.
"""
import argparse
import time


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    from bench_trainers import add_dataset_arguments, build_trainer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(ap)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--rounds', type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    _, trainer = build_trainer('nnUNetTrainer', args.d, args.c, args.p, device)
    trainer.initialize()   # builds the network; the data loaders only start in on_train_start, never here
    net = trainer.network
    batch = trainer.configuration_manager.batch_size
    patch = tuple(trainer.configuration_manager.patch_size)
    channels = trainer.num_input_channels

    def train_pass(x, rows):
        out = [net(part) for part in x.split(rows)]
        out = [o if isinstance(o, (list, tuple)) else [o] for o in out]
        # every output feeds the gradient, as deep supervision does; one backward through every part's graph
        sum(level.float().mean() for o in out for level in o).backward()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def teacher_pass(x, rows):
        with torch.no_grad():
            for part in x.split(rows):
                net(part)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    rows = []
    for r in range(args.rounds):
        for label, b, per_pass in ((str(batch), batch, batch), (str(2 * batch), 2 * batch, 2 * batch),
                                   (f'2 x {batch}', 2 * batch, batch)):
            x = torch.randn((b, channels) + patch, device=device)
            net.train()
            fb = _median_seconds(lambda: train_pass(x, per_pass), args.warmup, args.repeats)
            net.eval()
            fw = _median_seconds(lambda: teacher_pass(x, per_pass), args.warmup, args.repeats)
            rows.append((r, label, fb, fw))
    print(f'{args.c}, plans {args.p}, patch {patch}, {args.device}, float32; median of {args.repeats} after '
          f'{args.warmup} warm-up passes\n')
    print('| round | batch | forward + backward (s) | forward, no grad (s) |')
    print('|---|---|---|---|')
    for r, label, fb, fw in rows:
        print(f'| {r} | {label} | {fb:.3f} | {fw:.3f} |')
    for r in range(args.rounds):
        (_, _, fb1, _), (_, _, fb2, fw2), (_, _, fb_split, fw_split) = [row for row in rows if row[0] == r]
        print(f'\nround {r}: student over {2 * batch} rows + teacher over {2 * batch} rows = {fb2 + fw2:.3f} s in one '
              f'pass each, {(fb2 + fw2) / fb1:.2f}x plain\'s forward + backward over {batch}; in passes of {batch}: '
              f'{fb_split + fw_split:.3f} s, {(fb_split + fw_split) / fb1:.2f}x')


if __name__ == '__main__':
    main()
