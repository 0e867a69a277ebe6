"""The unlabelled stream: discovery and its errors, preprocessing equal to nnU-Net's own, staleness handling,
and weak/strong views with identical geometry."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnunet_semiseg.unlabeled.discovery import UnlabeledDataError, find_unlabeled_cases
from nnunet_semiseg.unlabeled.preprocess import (MANIFEST, _preprocess_case, ensure_unlabeled_preprocessed,
                                                 unlabeled_preprocessed_folder)

from conftest import make_trainer


def _fake_raw(tmp_path, channels=('MRI',), ending='.nii.gz'):
    raw = tmp_path / 'Dataset999_Fake'
    for sub in ('imagesTr', 'labelsTr', 'imagesTrUnlabeled'):
        (raw / sub).mkdir(parents=True)
    for case in ('lab_000', 'lab_001'):
        for c in range(len(channels)):
            (raw / 'imagesTr' / f'{case}_{c:04d}{ending}').write_bytes(b'')
        (raw / 'labelsTr' / f'{case}{ending}').write_bytes(b'')
    dataset_json = {'channel_names': {str(i): n for i, n in enumerate(channels)}, 'labels': {'background': 0, 'a': 1},
                    'numTraining': 2, 'file_ending': ending}
    (raw / 'dataset.json').write_text(json.dumps(dataset_json))
    return raw, dataset_json


def test_cases_are_grouped_by_id_in_channel_order(tmp_path):
    raw, dj = _fake_raw(tmp_path, channels=('T1', 'T2'))
    for name in ('u1_0001.nii.gz', 'u1_0000.nii.gz', 'u2_0000.nii.gz', 'u2_0001.nii.gz'):
        (raw / 'imagesTrUnlabeled' / name).write_bytes(b'')
    cases = find_unlabeled_cases(str(raw), dj)
    assert list(cases) == ['u1', 'u2']
    assert [os.path.basename(f) for f in cases['u1']] == ['u1_0000.nii.gz', 'u1_0001.nii.gz']


def test_no_unlabeled_folder_is_not_an_error(tmp_path):
    raw, dj = _fake_raw(tmp_path)
    shutil.rmtree(raw / 'imagesTrUnlabeled')
    assert find_unlabeled_cases(str(raw), dj) == {}


@pytest.mark.parametrize('files, message', [
    (['u1_0000.nii.gz', 'u1_0001.nii.gz'], 'channel 0001'),          # more channels than the dataset
    (['u1_0000.nrrd'], 'file ending'),                                 # another file type
    (['u1.nii.gz'], 'CASE_XXXX'),                                      # no channel suffix
    (['lab_000_0000.nii.gz'], 'also labelled'),                        # id of a labelled case
])
def test_bad_unlabeled_input_names_the_file_and_the_fix(tmp_path, files, message):
    raw, dj = _fake_raw(tmp_path)
    for name in files:
        (raw / 'imagesTrUnlabeled' / name).write_bytes(b'')
    with pytest.raises(UnlabeledDataError, match=message) as err:
        find_unlabeled_cases(str(raw), dj)
    assert files[-1].split('_0')[0].split('.')[0] in str(err.value)


def test_missing_channel_is_reported(tmp_path):
    raw, dj = _fake_raw(tmp_path, channels=('T1', 'T2'))
    (raw / 'imagesTrUnlabeled' / 'u1_0000.nii.gz').write_bytes(b'')
    with pytest.raises(UnlabeledDataError, match='u1_0001.nii.gz'):
        find_unlabeled_cases(str(raw), dj)


def _plans(phantom, configuration='2d'):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(os.path.join(phantom['preprocessed'], 'nnUNetPlans.json'))
    return pm, pm.get_configuration(configuration), load_json(os.path.join(phantom['preprocessed'], 'dataset.json'))


@pytest.mark.parametrize('configuration', ['2d', '3d_fullres'])
def test_preprocessing_equals_nnunets_own(phantom, tmp_path, configuration):
    """An image preprocessed as unlabelled is voxel-identical to nnU-Net's preprocessing of it as a labelled case."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pm, cm, dj = _plans(phantom, configuration)
    case = phantom['cases']['train'][0]
    image = os.path.join(phantom['raw'], 'imagesTr', f'{case}_0000.nii.gz')
    _preprocess_case('copy', [image], str(tmp_path / 'copy'), pm, cm, dj)
    ours, mask, _, props = nnUNetDatasetBlosc2(str(tmp_path)).load_case('copy')
    theirs, _, _, props_theirs = nnUNetDatasetBlosc2(os.path.join(phantom['preprocessed'], cm.data_identifier)
                                                     ).load_case(case)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert props['shape_after_cropping_and_before_resampling'] == props_theirs['shape_after_cropping_and_before_resampling']
    assert props['class_locations'] == {} and set(np.unique(np.asarray(mask))) <= {-1, 0}


def _unlabeled_copy(phantom, tmp_path, cases):
    raw = tmp_path / 'raw'
    (raw / 'imagesTrUnlabeled').mkdir(parents=True)
    (raw / 'imagesTr').mkdir()
    (raw / 'labelsTr').mkdir()
    for c in cases:
        shutil.copy(os.path.join(phantom['raw'], 'imagesTrUnlabeled', f'{c}_0000.nii.gz'), raw / 'imagesTrUnlabeled')
    return raw


def test_folder_is_kept_up_to_date_and_redone_when_plans_change(phantom, tmp_path):
    pm, cm, dj = _plans(phantom)
    raw = _unlabeled_copy(phantom, tmp_path, phantom['cases']['unlabeled'][:2])
    pre = tmp_path / 'pre'
    log = []
    folder, n = ensure_unlabeled_preprocessed(str(raw), str(pre), pm, cm, dj, log=log.append, progress=False)
    assert n == 2 and folder == unlabeled_preprocessed_folder(str(pre), cm.data_identifier)
    assert sorted(f for f in os.listdir(folder) if f.endswith('.pkl')) == \
        sorted(f'{c}.pkl' for c in phantom['cases']['unlabeled'][:2])

    log.clear()
    ensure_unlabeled_preprocessed(str(raw), str(pre), pm, cm, dj, log=log.append, progress=False)
    assert log == []  # nothing to do

    third = phantom['cases']['unlabeled'][2]
    shutil.copy(os.path.join(phantom['raw'], 'imagesTrUnlabeled', f'{third}_0000.nii.gz'), raw / 'imagesTrUnlabeled')
    ensure_unlabeled_preprocessed(str(raw), str(pre), pm, cm, dj, log=log.append, progress=False)
    assert log and 'preprocessing 1 unlabelled case(s) of 3' in log[0]

    first = phantom['cases']['unlabeled'][0]
    os.remove(raw / 'imagesTrUnlabeled' / f'{first}_0000.nii.gz')
    _, n = ensure_unlabeled_preprocessed(str(raw), str(pre), pm, cm, dj, log=log.append, progress=False)
    assert n == 2 and not os.path.exists(os.path.join(folder, f'{first}.b2nd'))

    # plans whose normalisation statistics differ: every case is redone, with different voxels
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    before = np.asarray(nnUNetDatasetBlosc2(folder).load_case(third)[0]).copy()
    plans = json.loads(json.dumps(pm.plans))
    plans['configurations']['2d']['normalization_schemes'] = ['RescaleTo01Normalization']
    pm2 = PlansManager(plans)
    log.clear()
    ensure_unlabeled_preprocessed(str(raw), str(pre), pm2, pm2.get_configuration('2d'), dj, log=log.append,
                                  progress=False)
    assert 'plans changed' in log[0] and 'preprocessing 2 unlabelled case(s) of 2' in log[1]
    after = np.asarray(nnUNetDatasetBlosc2(folder).load_case(third)[0])
    assert after.min() >= -1e-6 and after.max() <= 1 + 1e-6 and not np.allclose(before, after)


def test_unreadable_image_is_named_and_nothing_is_recorded(phantom, tmp_path):
    pm, cm, dj = _plans(phantom)
    raw = _unlabeled_copy(phantom, tmp_path, [])
    (raw / 'imagesTrUnlabeled' / 'broken_0000.nii.gz').write_bytes(b'not a nifti')
    with pytest.raises(UnlabeledDataError, match='"broken"'):
        ensure_unlabeled_preprocessed(str(raw), str(tmp_path / 'pre'), pm, cm, dj, log=lambda m: None,
                                      progress=False)
    folder = unlabeled_preprocessed_folder(str(tmp_path / 'pre'), cm.data_identifier)
    assert not os.path.isfile(os.path.join(folder, MANIFEST))


def _shift_ncc(a, b, max_shift=2):
    """Normalised cross-correlation of 2D maps a, b for every shift in [-max_shift, max_shift]^2."""
    h, w = a.shape
    m = max_shift
    out = {}
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            x = a[m + dy:h - m + dy, m + dx:w - m + dx].flatten()
            y = b[m:h - m, m:w - m].flatten()
            x, y = x - x.mean(), y - y.mean()
            out[(dy, dx)] = float((x * y).sum() / (x.norm() * y.norm() + 1e-8))
    return out


def test_weak_and_strong_views_share_geometry(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', fold=4)
    trainer.initialize()
    torch.manual_seed(0)
    np.random.seed(0)
    loader = trainer.get_unlabeled_dataloader()
    assert trainer.num_unlabeled_cases == len(phantom['cases']['unlabeled'])
    differs = 0
    for _ in range(3):
        batch = next(loader)
        weak, strong = batch['data_weak'], batch['data_strong']
        assert weak.shape == strong.shape == (trainer.batch_size, 1, *trainer.configuration_manager.patch_size)
        for w, s in zip(weak[:, 0], strong[:, 0]):
            ncc = _shift_ncc(w, s)
            assert max(ncc, key=ncc.get) == (0, 0), ncc  # the best alignment is no shift at all
            assert ncc[(0, 0)] > 0.5  # noise (variance up to 0.1) and blur lower it, they do not move it
            differs += int(not torch.equal(w, s))
    assert differs > 0  # photometric perturbations did happen
