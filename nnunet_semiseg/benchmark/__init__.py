"""``nnunet-semiseg benchmark -d ID -c CONFIG -tr T1 [T2 ...] -o OUT``: what the unlabelled scans buy, measured.

Plain ``nnUNetTrainer`` and each trainer of ``-tr`` are trained with nnU-Net's own training code on the same plans,
split, schedule and seeds (one subprocess per run, model folder under OUT), predict the evaluation cases from
``checkpoint_final`` without TTA, and are scored with :func:`nnunet_semiseg.evaluation.evaluate_folder` (Dice,
Jaccard, HD95, ASD per class). Outputs: ``OUT/<trainer>__seed<S>/predictions/``, ``OUT/benchmark.json`` (settings
and one record per run), ``OUT/benchmark.md`` (tables), ``OUT/benchmark.png`` (figure). A second call skips
finished runs and continues interrupted ones. See docs/benchmarking.md.

Modules: :mod:`.runner` (checks, presets, the loop over runs), :mod:`.child` (one run), :mod:`.report`
(aggregation, table, figure). Heavy imports stay inside functions so that ``nnunet-semiseg --help`` stays fast.
"""
import argparse
import sys


def _cli(args: argparse.Namespace) -> int:
    from nnunet_semiseg.benchmark.runner import run_benchmark
    from nnunet_semiseg.conversion.common import InputDataError

    def echo(message: str) -> None:
        print(message, flush=True)

    try:
        data = run_benchmark(args.dataset, args.configuration, args.trainers, args.out, seeds=args.seeds,
                             epochs=args.epochs, iterations=args.iterations, preset=args.preset, plans=args.plans,
                             device=args.device, fold=args.fold, val_iterations=args.val_iterations,
                             controls=args.controls, echo=echo)
    except InputDataError as error:
        print(f'nnunet-semiseg benchmark: error: {error}', file=sys.stderr)
        return 1
    import os
    md = os.path.join(os.path.abspath(args.out), 'benchmark.md')
    if os.path.isfile(md):
        with open(md) as fh:
            print('\n' + fh.read())
    print(f'results: {os.path.abspath(args.out)}/benchmark.{{json,md,png}}')
    if data.get('failed'):
        print(f'nnunet-semiseg benchmark: {len(data["failed"])} run(s) failed: {", ".join(data["failed"])}; run the '
              f'same command again to continue them', file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    """Register ``benchmark``."""
    p = subparsers.add_parser(
        'benchmark', help='train plain nnU-Net and semi-supervised trainers on the same data and seeds; table, '
                          'figure (resumable)',
        description='Train plain nnUNetTrainer (always, the baseline) and the -tr trainers with nnU-Net\'s own '
                    'training code on the same plans, split, schedule and seeds; predict from checkpoint_final '
                    '(no TTA); evaluate on imagesTs/labelsTs, or on fold FOLD\'s validation cases when the dataset '
                    'has no labelled test set. Writes OUT/<trainer>__seed<S>/ (model, predictions), '
                    'OUT/benchmark.json, .md and .png. Run the same command again to continue: finished runs are '
                    'skipped, interrupted ones continue from checkpoint_latest, added trainers or seeds run alone. '
                    'See docs/benchmarking.md.')
    p.add_argument('-d', '--dataset', required=True, help='dataset ID or name, planned and preprocessed for -c')
    p.add_argument('-c', '--configuration', required=True, help='nnU-Net configuration, e.g. 2d or 3d_fullres')
    p.add_argument('-tr', '--trainers', nargs='+', required=True, metavar='TRAINER',
                   help='trainers to compare with plain nnUNetTrainer, e.g. nnUNetTrainerMeanTeacher '
                        'nnUNetTrainerMONA (the sampler ablation: nnUNetTrainerMONA nnUNetTrainerARCO_SG '
                        'nnUNetTrainerARCO_SAG)')
    p.add_argument('-o', '--out', required=True, help='output folder (new, empty, or an earlier benchmark with the '
                                                      'same settings)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], metavar='S', help='seeds (default 0)')
    p.add_argument('--preset', choices=('cpu', 'full'),
                   help='cpu: derived plans <PLANS>_cpu (features capped at 16-32-64-128-256-256, batch 4 in 2d, 2 in '
                        '3d, same preprocessed data), 4 x 250 iterations; full: the plans as they are, nnU-Net\'s '
                        '1000 x 250 (default: full on cuda, cpu on cpu)')
    p.add_argument('--epochs', type=int, help='epochs (default: the preset\'s)')
    p.add_argument('--iterations', type=int, help='training iterations per epoch (default: the preset\'s)')
    p.add_argument('--val-iterations', type=int,
                   help='nnU-Net\'s per-epoch validation iterations (pseudo Dice in the log; default 50, as nnU-Net)')
    p.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier (default nnUNetPlans)')
    p.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda when available, else cpu')
    p.add_argument('-f', '--fold', type=int, default=0, help='fold (default 0): its training cases train, its '
                                                             'validation cases are evaluated when there is no '
                                                             'labelled test set')
    p.add_argument('--controls', type=int, default=0, metavar='N',
                   help='also train N (1-3) no-teach controls per seed, nnUNetTrainer_jitter1 to _jitterN: plain '
                        'nnU-Net with its initial weights scaled by 1 + 1e-6 N(0, 1), which teaches nothing. Their '
                        'differences to plain measure how far nothing moves a run, and the table gives each '
                        'trainer\'s paired Δ Dice in standard errors of that spread, given 3 or more control pairs (N x '
                        'seeds; default 0)')
    p.set_defaults(func=_cli)
