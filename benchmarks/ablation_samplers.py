"""Sampler ablation (ARCO's claim): train naive (MONA), SG and SAG, plus plain nnU-Net, on the same data, plans,
schedule and seeds, and report Dice per class on held-out cases.

* Without ``-d``: the demo's phantom (labelled, unlabelled and test cases), Dice on its test cases.
* With ``-d ID``: a planned dataset of yours with ``imagesTrUnlabeled/`` (e.g. from ``nnunet-semiseg convert acdc``);
  trains fold ``-f`` of its ``splits_final.json`` and evaluates that fold's validation cases from ``imagesTr`` /
  ``labelsTr``.

    python benchmarks/ablation_samplers.py --epochs 8 --iterations 15 --seeds 0 1
    python benchmarks/ablation_samplers.py -d 27 -c 2d -p nnUNetPlans --device cuda --epochs 50 --iterations 100
"""
import argparse
import json
import os
import shutil
import tempfile

import numpy as np

TRAINERS = ['nnUNetTrainer', 'nnUNetTrainerMONA', 'nnUNetTrainerARCO_SG', 'nnUNetTrainerARCO_SAG']


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', '--dataset', default=None)
    p.add_argument('-c', '--configuration', default='2d')
    p.add_argument('-p', '--plans', default='nnUNetPlans')
    p.add_argument('-f', '--fold', type=int, default=0)
    p.add_argument('--trainers', nargs='+', default=TRAINERS)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--iterations', type=int, default=15)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=None, help='folder for predictions and results.json (default: a temp folder)')
    args = p.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix='nnunet_semiseg_ablation_'))
    os.makedirs(out, exist_ok=True)

    from nnunet_semiseg import demo

    if args.dataset is None:
        results = {}
        for seed in args.seeds:
            results[seed] = demo.run_demo(os.path.join(out, f'seed{seed}'), args.configuration, args.epochs,
                                          args.iterations, seed=seed, trainers=args.trainers)
        labels = {1: 'LV', 2: 'MYO', 3: 'RV'}
    else:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        name = maybe_convert_to_dataset_name(args.dataset)
        raw = os.path.join(str(nnUNet_raw), name)
        dataset_json = load_json(os.path.join(raw, 'dataset.json'))
        labels = {v: k for k, v in dataset_json['labels'].items() if isinstance(v, int) and v > 0}
        val = load_json(os.path.join(str(nnUNet_preprocessed), name, 'splits_final.json'))[args.fold]['val']
        ending = dataset_json['file_ending']
        images = os.path.join(out, 'val_images')
        gts = os.path.join(out, 'val_labels')
        os.makedirs(images, exist_ok=True)
        os.makedirs(gts, exist_ok=True)
        for case in val:
            for f in os.listdir(os.path.join(raw, 'imagesTr')):
                if f.startswith(case + '_') and f.endswith(ending) and len(f) == len(case) + 5 + len(ending):
                    shutil.copy(os.path.join(raw, 'imagesTr', f), images)
            shutil.copy(os.path.join(raw, 'labelsTr', case + ending), gts)
        results = {}
        for seed in args.seeds:
            results[seed] = {}
            for trainer_name in args.trainers:
                trainer = demo.train_in_process(trainer_name, name, args.configuration, args.plans, args.fold,
                                                args.epochs, args.iterations, max(1, args.iterations // 10), seed,
                                                args.device)
                pred = os.path.join(out, f'seed{seed}', trainer_name)
                demo.predict_folder(trainer.output_folder_base, images, pred, args.fold, args.device)
                results[seed][trainer_name] = demo.dice_per_class(pred, gts, sorted(labels))

    print(f'\nDice per class (mean over held-out cases), {args.epochs} epochs x {args.iterations} iterations, '
          f'seeds {args.seeds}')
    header = '| trainer | ' + ' | '.join(labels[k] for k in sorted(labels)) + ' | mean |'
    print(header)
    print('|' + '---|' * (len(labels) + 2))
    for t in args.trainers:
        per_class = [float(np.mean([results[s][t][k] for s in args.seeds])) for k in sorted(labels)]
        print(f'| {t} | ' + ' | '.join(f'{v:.4f}' for v in per_class) + f' | {np.mean(per_class):.4f} |')
    with open(os.path.join(out, 'results.json'), 'w') as fh:
        json.dump({str(s): {t: {str(k): v for k, v in r.items()} for t, r in res.items()}
                   for s, res in results.items()}, fh, indent=1)
    print(f'results in {out}/results.json')


if __name__ == '__main__':
    main()
