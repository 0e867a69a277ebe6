"""One command-line end-to-end run, exactly as a user types it: nnUNetv2_plan_and_preprocess on a dataset with
imagesTrUnlabeled/, nnunet-semiseg preprocess-unlabeled, nnUNetv2_train with our trainer, nnUNetv2_predict, and
nnunet-semiseg export predicted by nnU-Net with our package switched off (a stock install)."""
import os
import subprocess
import sys

import numpy as np


BIN = os.path.dirname(sys.executable)
DATASET_ID = 993

VARIANT = '''
import torch
from nnunet_semiseg.training.mean_teacher import nnUNetTrainerMeanTeacher


class nnUNetTrainerMeanTeacher_cliTest(nnUNetTrainerMeanTeacher):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 1
'''


def run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f'{" ".join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}'
    return out.stdout


def test_command_line_end_to_end(tmp_path):
    from nnunet_semiseg.demo import make_phantom_dataset, write_cpu_plans
    raw, pre = os.environ['nnUNet_raw'], os.environ['nnUNet_preprocessed']
    folder, cases = make_phantom_dataset(raw, DATASET_ID, 'CliPhantom', n_labeled=4, n_val=1, n_unlabeled=3,
                                         n_test=2, shape=(6, 32, 32), seed=3)
    name = os.path.basename(folder)
    user_ext = tmp_path / 'my_trainers'
    user_ext.mkdir()
    (user_ext / 'my_variants.py').write_text(VARIANT)
    env = {k: v for k, v in os.environ.items() if k != 'NNUNET_SEMISEG_NO_AUTOENV'}
    env['nnUNet_extTrainer'] = str(user_ext)  # the user's own folder; ours is appended by the .pth hook
    plan_env = {k: v for k, v in env.items() if k != 'nnUNet_n_proc_DA'}  # the planner crashes on 0

    run([f'{BIN}/nnUNetv2_plan_and_preprocess', '-d', str(DATASET_ID), '-c', '2d', '--verify_dataset_integrity',
         '-np', '1', '-npfp', '1'], plan_env)
    out = run([f'{BIN}/nnunet-semiseg', 'preprocess-unlabeled', '-d', str(DATASET_ID), '-c', '2d', '-np', '1'], env)
    assert '2d: 3 unlabelled case(s)' in out
    write_cpu_plans(os.path.join(pre, name), name='nnUNetPlans_tiny', features=(4, 8, 16, 32), batch_size_2d=4)

    out = run([f'{BIN}/nnUNetv2_train', str(DATASET_ID), '2d', '0', '-tr', 'nnUNetTrainerMeanTeacher_cliTest',
               '-p', 'nnUNetPlans_tiny', '-device', 'cpu'], env)
    assert 'loss terms: supervised' in out and 'unlabelled stream: 3 cases' in out
    model = os.path.join(os.environ['nnUNet_results'], name, 'nnUNetTrainerMeanTeacher_cliTest__nnUNetPlans_tiny__2d')
    assert os.path.isfile(os.path.join(model, 'fold_0', 'validation', 'summary.json'))

    images = os.path.join(folder, 'imagesTs')
    run([f'{BIN}/nnUNetv2_predict', '-i', images, '-o', str(tmp_path / 'ours'), '-d', str(DATASET_ID), '-c', '2d',
         '-tr', 'nnUNetTrainerMeanTeacher_cliTest', '-p', 'nnUNetPlans_tiny', '-f', '0', '--disable_tta',
         '-npp', '1', '-nps', '1', '-device', 'cpu'], env)

    exported = tmp_path / 'exported_results'
    run([f'{BIN}/nnunet-semiseg', 'export', model, str(exported)], env)
    stock = {k: v for k, v in env.items() if k != 'nnUNet_extTrainer'}
    stock.update(NNUNET_SEMISEG_NO_AUTOENV='1', nnUNet_results=str(exported))
    run([f'{BIN}/nnUNetv2_predict', '-i', images, '-o', str(tmp_path / 'stock'), '-d', str(DATASET_ID), '-c', '2d',
         '-tr', 'nnUNetTrainer', '-p', 'nnUNetPlans_tiny', '-f', '0', '--disable_tta', '-npp', '1', '-nps', '1',
         '-device', 'cpu'], stock)

    import SimpleITK as sitk
    for case in cases['test']:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'ours' / f'{case}.nii.gz')))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'stock' / f'{case}.nii.gz')))
        np.testing.assert_array_equal(a, b)
