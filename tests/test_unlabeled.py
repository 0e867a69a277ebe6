"""The unlabelled stream: discovery and its errors, preprocessing equal to nnU-Net's own, staleness handling,
and weak/strong views with identical geometry."""
import json
import os
import re
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


# ------------------------------------------------------------------------------------- bad-input matrix (issue 11)

def _write_image(path, array, spacing_xyz):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(image, str(path), True)


def _bad_image(phantom, kind):
    """A phantom unlabelled volume made bad: NaN or +inf voxels, or only its first slice as a 2-D image."""
    import SimpleITK as sitk
    source = sitk.ReadImage(os.path.join(phantom['raw'], 'imagesTrUnlabeled',
                                         phantom['cases']['unlabeled'][0] + '_0000.nii.gz'))
    array = sitk.GetArrayFromImage(source).astype(np.float32)
    if kind == 'nan':
        array[0, :2, :3] = np.nan
        return array, source.GetSpacing()
    if kind == 'inf':
        array[1, 4, 4] = np.inf
        array[2, 4, 4] = -np.inf
        return array, source.GetSpacing()
    return array[0], source.GetSpacing()[:2]  # '2d'


def _raw_copy(phantom, tmp_path, ending):
    """A raw dataset with one labelled and two unlabelled phantom cases, images written with ``ending``."""
    import SimpleITK as sitk
    raw = tmp_path / 'raw'
    for sub in ('imagesTr', 'labelsTr', 'imagesTrUnlabeled'):
        (raw / sub).mkdir(parents=True)
    case = phantom['cases']['train'][0]
    copies = {os.path.join('imagesTr', f'{case}_0000'): os.path.join('imagesTr', f'{case}_0000.nii.gz'),
              os.path.join('labelsTr', case): os.path.join('labelsTr', f'{case}.nii.gz')}
    for c in phantom['cases']['unlabeled'][:2]:
        copies[os.path.join('imagesTrUnlabeled', f'{c}_0000')] = os.path.join('imagesTrUnlabeled', f'{c}_0000.nii.gz')
    for target, source in copies.items():
        sitk.WriteImage(sitk.ReadImage(os.path.join(phantom['raw'], source)), str(raw / target) + ending, True)
    return raw


def _plans_with(phantom, configuration, ending, reader):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm, _, dj = _plans(phantom, configuration)
    plans = json.loads(json.dumps(pm.plans))
    plans['image_reader_writer'] = reader
    pm = PlansManager(plans)
    return pm, pm.get_configuration(configuration), dict(dj, file_ending=ending)


# SimpleITK's NIfTI reader itself turns NaN/inf into 0, so non-finite values reach nnU-Net through NRRD/MHA files
# (SimpleITKIO) and through NibabelIO; the 2-D case is independent of the format.
@pytest.mark.parametrize('kind, ending, reader, message', [
    ('nan', '.nrrd', 'SimpleITKIO', r'NaN or infinite values \(6 NaN, 0 infinite voxel\(s\)\); repair the file'),
    ('inf', '.nrrd', 'SimpleITKIO', r'NaN or infinite values \(0 NaN, 2 infinite voxel\(s\)\); repair the file'),
    ('nan', '.nii.gz', 'NibabelIO', r'NaN or infinite values \(6 NaN, 0 infinite voxel\(s\)\); repair the file'),
    ('inf', '.nii.gz', 'NibabelIO', r'NaN or infinite values \(0 NaN, 2 infinite voxel\(s\)\); repair the file'),
    ('2d', '.nii.gz', 'SimpleITKIO',
     r'is a 2-D image \(shape \(1, 32, 32\)\), but the labelled images in imagesTr are 3-D\. Replace it'),
])
def test_non_finite_or_2d_unlabeled_image_is_refused_naming_file_and_fix(phantom, tmp_path, kind, ending, reader,
                                                                           message):
    pm, cm, dj = _plans_with(phantom, '3d_fullres', ending, reader)
    raw = _raw_copy(phantom, tmp_path, ending)
    _write_image(raw / 'imagesTrUnlabeled' / f'bad_0000{ending}', *_bad_image(phantom, kind))
    with pytest.raises(UnlabeledDataError, match=message) as err:
        ensure_unlabeled_preprocessed(str(raw), str(tmp_path / 'pre'), pm, cm, dj, log=lambda m: None,
                                      progress=False)
    assert f'bad_0000{ending}' in str(err.value) and 'imagesTrUnlabeled/' in str(err.value)
    assert '\n' not in str(err.value)
    assert not os.path.isfile(os.path.join(unlabeled_preprocessed_folder(str(tmp_path / 'pre'), cm.data_identifier),
                                           MANIFEST))
    os.remove(raw / 'imagesTrUnlabeled' / f'bad_0000{ending}')  # the good cases alone pass
    assert ensure_unlabeled_preprocessed(str(raw), str(tmp_path / 'pre'), pm, cm, dj, log=lambda m: None,
                                         progress=False)[1] == 2


def test_2d_images_pass_in_a_2d_dataset(phantom, tmp_path):
    """The dimensionality check compares with the labelled images, it does not demand 3-D."""
    from nnunet_semiseg.unlabeled.preprocess import labeled_spatial_dims
    pm, _, dj = _plans(phantom)
    raw = tmp_path / 'raw2d'
    (raw / 'imagesTr').mkdir(parents=True)
    (raw / 'labelsTr').mkdir()
    array, spacing = _bad_image(phantom, '2d')
    _write_image(raw / 'imagesTr' / 'slice_0000.nii.gz', array, spacing)
    _write_image(raw / 'labelsTr' / 'slice.nii.gz', np.zeros(array.shape, np.uint8), spacing)
    assert labeled_spatial_dims(str(raw), pm, dj) == 2
    assert labeled_spatial_dims(phantom['raw'], pm, dj) == 3


def test_shared_nonfinite_check_and_spatial_dims():
    from nnunet_semiseg.image_checks import nonfinite_problem, spatial_dims
    assert nonfinite_problem(np.zeros((2, 3), np.float32), 'a.nii.gz') is None
    assert nonfinite_problem(np.zeros((2, 3), np.int16), 'a.nii.gz') is None
    bad = np.zeros((2, 3), np.float64)
    bad[0, 0], bad[1, 1], bad[1, 2] = np.nan, np.inf, -np.inf
    assert nonfinite_problem(bad, 'a.nii.gz').startswith('a.nii.gz: the image contains NaN or infinite values '
                                                         '(1 NaN, 2 infinite voxel(s))')
    assert spatial_dims((1, 1, 32, 32), (1.5 * 999, 1.5, 1.5)) == 2      # SimpleITKIO's 2-D convention
    assert spatial_dims((3, 1, 224, 224), (999, 1, 1)) == 2               # NaturalImage2DIO's
    assert spatial_dims((1, 1, 32, 32), (10.0, 0.5, 0.5)) == 3            # a one-slice 3-D slab stays 3-D
    assert spatial_dims((1, 8, 32, 32), (999, 1, 1)) == 3


def test_stray_files_are_ignored_with_a_warning_other_image_formats_refused(tmp_path):
    raw, dj = _fake_raw(tmp_path)
    folder = raw / 'imagesTrUnlabeled'
    for name in ('u1_0000.nii.gz', 'notes.txt', '.DS_Store', '._u1_0000.nii.gz', 'Thumbs.db'):
        (folder / name).write_bytes(b'')
    (folder / 'sub').mkdir()
    with pytest.warns(UserWarning, match=r'ignored 4 file\(s\) that are hidden or not images: \.DS_Store, '
                                         r'\._u1_0000\.nii\.gz, Thumbs\.db, notes\.txt') as record:
        cases = find_unlabeled_cases(str(raw), dj)
    assert list(cases) == ['u1'] and len(record) == 1
    for other in ('u2_0000.nii', 'u2_0000.mha', 'u2_0000.NRRD', 'u2.h5'):
        (folder / other).write_bytes(b'')
        with pytest.raises(UnlabeledDataError, match=f'{re.escape(other)}: unlabelled images must have the '
                                                     f'dataset\'s file ending ".nii.gz"'):
            find_unlabeled_cases(str(raw), dj)
        (folder / other).unlink()


def test_cli_and_trainer_start_refuse_a_2d_unlabeled_image(phantom, capsys):
    """The same check runs in ``nnunet-semiseg preprocess-unlabeled`` and when a trainer starts, before any step."""
    from nnunet_semiseg.cli import main
    bad = os.path.join(phantom['raw'], 'imagesTrUnlabeled', 'zz_slice_0000.nii.gz')
    _write_image(bad, *_bad_image(phantom, '2d'))
    try:
        code = main(['preprocess-unlabeled', '-d', str(phantom['id']), '-c', '2d', '-p', phantom['plans'],
                     '-np', '1'])
        printed = capsys.readouterr().out.strip().splitlines()
        assert code == 1
        assert printed[-1].startswith('error: unlabelled case "zz_slice" (') and bad in printed[-1]
        assert 'is a 2-D image' in printed[-1] and 'Replace it with a 3-D image' in printed[-1]

        trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', fold=3)
        trainer.train_step = None  # never reached
        with pytest.raises(UnlabeledDataError, match='zz_slice_0000.nii.gz'):
            trainer.run_training()
        assert trainer.semiseg_step == 0
    finally:
        os.remove(bad)
