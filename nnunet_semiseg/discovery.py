"""Finding our trainers the way nnU-Net does (``nnUNet_extTrainer``), and the ``trainers-dir`` / ``env``
sub-commands for users who start Python without site hooks (``python -S``) or set the variable by hand."""
import os

from nnunet_semiseg._autoenv import trainers_dir


def find_trainer(name: str):
    """The trainer class called ``name``, looked up exactly as ``nnUNetv2_train -tr`` and ``nnUNetv2_predict`` do
    (nnU-Net's built-ins first, then the folders in ``nnUNet_extTrainer``; ours is added if missing)."""
    folder = trainers_dir()
    current = os.environ.get('nnUNet_extTrainer', '')
    if folder not in current.split(os.pathsep):
        os.environ['nnUNet_extTrainer'] = os.pathsep.join(p for p in (current, folder) if p)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('trainers-dir', help='print the folder to put in nnUNet_extTrainer')
    p.set_defaults(func=lambda args: print(trainers_dir()) or 0)
    p = subparsers.add_parser('env', help='print a shell line that makes nnU-Net find our trainers')
    p.set_defaults(func=_env)


def _env(args) -> int:
    current = os.environ.get('nnUNet_extTrainer', '')
    folder = trainers_dir()
    value = current if folder in current.split(os.pathsep) else os.pathsep.join(p for p in (current, folder) if p)
    print(f'export nnUNet_extTrainer="{value}"')
    return 0
