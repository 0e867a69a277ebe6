"""Seconds per training iteration and peak memory of our trainers against nnU-Net's plain ``nnUNetTrainer`` on the
same plans and data.

Each trainer runs in its own subprocess (so peak memory is its own): it is built exactly as ``nnUNetv2_train``
builds it, its data loaders start, ``--warmup`` steps run untimed, then ``--iterations`` steps are timed (median and
mean seconds per step, labelled + unlabelled batch, teacher, heads and losses included). Contrastive trainers are
measured in their fine-tuning phase by default (the costlier one); ``--phase pretrain`` measures relational
pre-training. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process' peak resident set size on CPU.

Without ``-d`` a phantom dataset is generated and planned in a temporary folder (2d and 3d_fullres, CPU-sized plans).

    python benchmarks/bench_trainers.py                         # phantom, 2d, CPU, all trainers
    python benchmarks/bench_trainers.py -c 3d_fullres
    python benchmarks/bench_trainers.py -d 27 -c 2d -p nnUNetPlans --device cuda   # your planned dataset
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

TRAINERS = ['nnUNetTrainer', 'nnUNetTrainerMeanTeacher', 'nnUNetTrainerMONA', 'nnUNetTrainerARCO_SG',
            'nnUNetTrainerARCO_SAG', 'nnUNetTrainerACTION', 'nnUNetTrainerACTIONpp']


def measure(args) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_semiseg.discovery import find_trainer

    torch.manual_seed(0)
    name = maybe_convert_to_dataset_name(args.dataset)
    pre = os.path.join(str(nnUNet_preprocessed), name)
    plans = load_json(os.path.join(pre, args.plans + '.json'))
    plans['continue_training'] = False
    device = torch.device(args.device)
    trainer = find_trainer(args.single)(plans, args.configuration, 0, load_json(os.path.join(pre, 'dataset.json')),
                                        device)
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1000, 250
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    if hasattr(trainer, 'pretrain_iterations') and args.phase == 'finetune':
        trainer.semiseg_step = trainer.pretrain_iterations  # jump to the fine-tuning phase
    trainer.on_train_epoch_start()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.iterations):
        batch = next(trainer.dataloader_train)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.on_train_end = lambda: None
    for loader in (trainer.dataloader_train, trainer.dataloader_val, getattr(trainer, 'dataloader_unlabeled', None)):
        if hasattr(loader, '_finish'):
            loader._finish()
    return {'trainer': args.single, 'median_s': float(np.median(times)), 'mean_s': float(np.mean(times)),
            'peak_mb': peak_mb, 'batch': trainer.batch_size, 'patch': list(trainer.configuration_manager.patch_size),
            'phase': args.phase if hasattr(trainer, 'pretrain_iterations') else '-'}


def make_phantom(root: str) -> None:
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[var] = os.path.join(root, var)
        os.makedirs(os.environ[var], exist_ok=True)
    from nnunet_semiseg.demo import make_phantom_dataset, plan_and_preprocess, write_cpu_plans
    make_phantom_dataset(os.environ['nnUNet_raw'], 995, 'BenchPhantom', n_labeled=6, n_val=0, n_unlabeled=8, n_test=0,
                         shape=(16, 96, 96))
    plan_and_preprocess(995, ['2d', '3d_fullres'], num_processes=2, progress=False)
    write_cpu_plans(os.path.join(os.environ['nnUNet_preprocessed'], 'Dataset995_BenchPhantom'),
                    features=(16, 32, 64, 128), batch_size_2d=8, batch_size_3d=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', '--dataset', default=None, help='planned dataset (default: a generated phantom)')
    p.add_argument('-c', '--configuration', default='2d')
    p.add_argument('-p', '--plans', default=None, help='default: nnUNetPlans, or the CPU-sized plans of the phantom')
    p.add_argument('--trainers', nargs='+', default=TRAINERS)
    p.add_argument('--iterations', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--phase', choices=['finetune', 'pretrain'], default='finetune')
    p.add_argument('--device', default='cpu')
    p.add_argument('--single', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.single:
        print('RESULT ' + json.dumps(measure(args)), flush=True)
        return
    env = dict(os.environ)
    env.setdefault('nnUNet_def_n_proc', '2')
    if args.dataset is None:
        root = tempfile.mkdtemp(prefix='nnunet_semiseg_bench_')
        os.environ.update({k: v for k, v in env.items() if k == 'nnUNet_def_n_proc'})
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's planning chatter; the table goes to stdout
            make_phantom(root)
        env.update({k: os.environ[k] for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')})
        args.dataset, args.plans = '995', args.plans or 'nnUNetPlans_demo'
    args.plans = args.plans or 'nnUNetPlans'
    env.setdefault('nnUNet_n_proc_DA', '2' if args.device == 'cpu' else '8')
    rows = []
    for trainer in args.trainers:
        cmd = [sys.executable, os.path.abspath(__file__), '--single', trainer, '-d', args.dataset, '-c',
               args.configuration, '-p', args.plans, '--iterations', str(args.iterations), '--warmup',
               str(args.warmup), '--phase', args.phase, '--device', args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        if out.returncode != 0 or not line:
            print(f'{trainer} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
            continue
        rows.append(json.loads(line[0][len('RESULT '):]))
        print(f'  measured {trainer}', file=sys.stderr, flush=True)
    if not rows:
        sys.exit(1)
    base = next((r for r in rows if r['trainer'] == 'nnUNetTrainer'), rows[0])
    print(f'\ndataset {args.dataset}, {args.configuration}, plans {args.plans}, device {args.device}, '
          f'batch {base["batch"]} labelled (+ the same unlabelled), patch {base["patch"]}, '
          f'{args.iterations} timed iterations after {args.warmup} warm-up')
    print('| trainer | phase | s/iteration (median) | x nnUNetTrainer | peak memory (MB) |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["trainer"]} | {r["phase"]} | {r["median_s"]:.3f} | {r["median_s"] / base["median_s"]:.2f} | '
              f'{r["peak_mb"]:.0f} |')


if __name__ == '__main__':
    main()
