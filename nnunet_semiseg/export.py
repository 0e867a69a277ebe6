"""``nnunet-semiseg export``: turn one of our model folders into a folder that a stock nnU-Net install (without
this package) predicts with.

A checkpoint names its trainer class and nnU-Net's predictor looks that class up by name; ours exist only where
this package is installed. Our trainers never change ``build_network_architecture``, so the network is exactly
the one the plain ``nnUNetTrainer`` builds: the export writes checkpoints with ``trainer_name = 'nnUNetTrainer'``,
nnU-Net's own keys, and the student's (or, with ``--weights teacher``, the EMA teacher's) ``network_weights``,
under ``OUT/<DatasetName>/nnUNetTrainer__<plans>__<configuration>/`` with plans.json, dataset.json and
dataset_fingerprint.json. Use it with ``nnUNet_results=OUT nnUNetv2_predict ... -tr nnUNetTrainer`` or
``nnUNetv2_predict_from_modelfolder -m <that folder>``. The source folder is only read.
"""
import os
import re
import shutil
from typing import Iterable, Optional

TEACHER_PREFIX = 'averaged.module.network.'


def teacher_network_weights(semiseg_state: dict) -> dict:
    """The EMA teacher's network state_dict (same keys as ``network_weights``) from a checkpoint's semiseg_state."""
    teacher = semiseg_state['teacher']
    return {k[len(TEACHER_PREFIX):]: v for k, v in teacher.items() if k.startswith(TEACHER_PREFIX)}


def export_model_folder(model_folder: str, out_results: str, folds: Optional[Iterable] = None,
                        checkpoint_name: str = 'checkpoint_final.pth', weights: str = 'student',
                        overwrite: bool = False) -> str:
    """Write a stock-nnU-Net model folder; returns its path. See the module docstring.

    Raises ``FileNotFoundError`` for a missing folder/checkpoint, ``FileExistsError`` when the target exists and
    ``overwrite`` is False, ``ValueError`` for an unknown ``weights`` or a checkpoint without a teacher.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if weights not in ('student', 'teacher'):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    model_folder = os.path.abspath(model_folder)
    for f in ('plans.json', 'dataset.json'):
        if not os.path.isfile(os.path.join(model_folder, f)):
            raise FileNotFoundError(f'{model_folder} is not an nnU-Net model folder ({f} missing). Pass the '
                                    f'folder named <Trainer>__<Plans>__<configuration>.')
    trainer_plans_config = os.path.basename(model_folder)
    parts = trainer_plans_config.split('__')
    if len(parts) != 3:
        raise ValueError(f'{model_folder}: expected a folder named <Trainer>__<Plans>__<configuration>')
    _, plans_name, configuration = parts
    dataset_name = load_json(os.path.join(model_folder, 'plans.json'))['dataset_name']
    if folds is None:
        folds = sorted(m.group(1) for n in os.listdir(model_folder)
                       if (m := re.fullmatch(r'fold_(\w+)', n)) and
                       os.path.isfile(os.path.join(model_folder, n, checkpoint_name)))
    folds = [str(f) for f in folds]
    if not folds:
        raise FileNotFoundError(f'no fold_*/{checkpoint_name} in {model_folder}')
    target = os.path.join(os.path.abspath(out_results), dataset_name, f'nnUNetTrainer__{plans_name}__{configuration}')
    checkpoints = {}
    for fold in folds:  # read and check everything before writing anything
        path = os.path.join(model_folder, f'fold_{fold}', checkpoint_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} not found')
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
        if weights == 'teacher':
            if 'semiseg_state' not in ckpt:
                raise ValueError(f'{path} has no EMA teacher (not written by an nnunet-semiseg trainer)')
            network_weights = teacher_network_weights(ckpt['semiseg_state'])
        else:
            network_weights = ckpt['network_weights']
        checkpoints[fold] = {
            'network_weights': network_weights,
            'trainer_name': 'nnUNetTrainer',
            'init_args': ckpt['init_args'],
            'inference_allowed_mirroring_axes': ckpt.get('inference_allowed_mirroring_axes'),
            'current_epoch': ckpt.get('current_epoch'),
            '_best_ema': ckpt.get('_best_ema'),
            'exported_from': {'trainer_name': ckpt.get('trainer_name'), 'weights': weights, 'checkpoint': path},
        }
    if os.path.isdir(target):
        if not overwrite:
            raise FileExistsError(f'{target} exists: choose another output folder or pass --overwrite')
    os.makedirs(target, exist_ok=True)
    for f in ('plans.json', 'dataset.json', 'dataset_fingerprint.json'):
        if os.path.isfile(os.path.join(model_folder, f)):
            shutil.copyfile(os.path.join(model_folder, f), os.path.join(target, f))
    for fold, ckpt in checkpoints.items():
        os.makedirs(os.path.join(target, f'fold_{fold}'), exist_ok=True)
        torch.save(ckpt, os.path.join(target, f'fold_{fold}', checkpoint_name))
    return target


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('export', help='write a model folder that a stock nnU-Net (without this plugin) '
                                             'predicts with')
    p.add_argument('model_folder', help='our trainer\'s folder, <Trainer>__<Plans>__<configuration>')
    p.add_argument('out_results', help='an nnUNet_results-like root folder for the exported model')
    p.add_argument('-f', '--folds', nargs='+', default=None, help='default: every fold with the checkpoint')
    p.add_argument('-chk', '--checkpoint', default='checkpoint_final.pth')
    p.add_argument('--weights', choices=['student', 'teacher'], default='student',
                   help='network to export: the student (what our trainers validate and predict with) or the EMA '
                        'teacher')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        target = export_model_folder(args.model_folder, args.out_results, args.folds, args.checkpoint, args.weights,
                                     args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'error: {e}')
        return 1
    print(f'exported to {target}\npredict with: nnUNet_results={os.path.abspath(args.out_results)} nnUNetv2_predict '
          f'-i IN -o OUT -d <dataset> -c <configuration> -p <plans> -tr nnUNetTrainer -f <folds>')
    return 0
