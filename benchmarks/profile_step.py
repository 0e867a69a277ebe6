"""Top operations (torch.profiler, self CPU time) of one training step of a trainer on a planned dataset, as a
markdown table for docs/benchmarks.md. The two-stage trainers are profiled in their fine-tuning phase unless
``--phase pretrain``. Shares are what to compare: on a loaded machine every absolute figure grows.

    python benchmarks/profile_step.py -d Dataset027_ACDC -c 2d -p nnUNetPlans_cpu -tr nnUNetTrainerMONA
    python benchmarks/profile_step.py -d 27 -p nnUNetPlans_cpu -tr nnUNetTrainerMONA:lambda_equivariance=0
"""
import argparse
import os


def main(argv=None) -> None:
    from bench_trainers import add_dataset_arguments, build_trainer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(ap)
    ap.add_argument('-tr', default='nnUNetTrainerMONA', help='NAME[:attr=value,...] as in bench_trainers.py')
    ap.add_argument('--phase', choices=('finetune', 'pretrain'), default='finetune')
    ap.add_argument('--rows', type=int, default=14)
    ap.add_argument('--warmup', type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault('nnUNet_n_proc_DA', '0')   # augmentation in the main process: no worker in the profile
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    _, trainer = build_trainer(args.tr, args.d, args.c, args.p, torch.device('cpu'))
    trainer.on_train_start()
    if hasattr(trainer, 'pretrain_iterations') and args.phase == 'finetune':
        trainer.semiseg_step = trainer.pretrain_iterations
    trainer.on_train_epoch_start()
    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    batch = next(trainer.dataloader_train)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f'{args.tr} ({args.phase}), one step, total self CPU {total / 1e6:.2f} s\n')
    print('| operation | self CPU (s) | share | calls |\n|---|---|---|---|')
    for e in events[:args.rows]:
        print(f'| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.0f} % '
              f'| {e.count} |')
    os._exit(0)   # nnU-Net's loader threads would otherwise keep the process alive


if __name__ == '__main__':
    main()
