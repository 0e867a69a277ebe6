"""Zero-set-up trainer discovery: the .pth hook appends our trainer folder to nnUNet_extTrainer at interpreter
start, keeps a user's entries, can be switched off, and nnU-Net's own lookup finds the classes."""
import os
import subprocess
import sys

import pytest

from nnunet_semiseg._autoenv import trainers_dir


def _env_in_fresh_interpreter(**env):
    full = {k: v for k, v in os.environ.items() if k not in ('nnUNet_extTrainer', 'NNUNET_SEMISEG_NO_AUTOENV')}
    full.update(env)
    out = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get("nnUNet_extTrainer", ""))'],
                         env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_fresh_interpreter_has_our_folder():
    assert _env_in_fresh_interpreter().split(os.pathsep) == [trainers_dir()]


def test_users_entries_are_kept_and_come_first():
    assert _env_in_fresh_interpreter(nnUNet_extTrainer='/my/trainers').split(os.pathsep) == \
        ['/my/trainers', trainers_dir()]


def test_can_be_switched_off():
    assert _env_in_fresh_interpreter(NNUNET_SEMISEG_NO_AUTOENV='1') == ''


def test_folder_holds_only_trainer_modules_with_distinct_names():
    # nnU-Net imports every file there as a top-level module: names must not shadow real packages
    modules = [f for f in os.listdir(trainers_dir()) if f.endswith('.py')]
    assert modules and all(f.startswith('nnunet_semiseg_') for f in modules)


@pytest.mark.parametrize('name', ['nnUNetTrainerMeanTeacher', 'nnUNetTrainerMONA', 'nnUNetTrainerARCO_SG',
                                  'nnUNetTrainerARCO_SAG', 'nnUNetTrainerACTION', 'nnUNetTrainerACTIONpp',
                                  'nnUNetTrainer_jitter1', 'nnUNetTrainer_jitter3'])
def test_nnunets_lookup_finds_the_library_class(name):
    """nnU-Net's own lookup returns the installed package's class itself: importable, picklable, subclassable."""
    import importlib
    import pickle
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_semiseg.discovery import find_trainer
    cls = find_trainer(name)
    assert issubclass(cls, nnUNetTrainer) and cls.__module__.startswith('nnunet_semiseg.training.')
    assert getattr(importlib.import_module(cls.__module__), name) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_trainers_dir_command_prints_the_folder():
    out = subprocess.run([sys.executable, '-m', 'nnunet_semiseg.cli', 'trainers-dir'], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == trainers_dir()
