"""Converters: every layout as a tiny fixture made here (no download), plus the real HDF5 subsets in
../shared/data when present. Checks case counts, splits_final.json, label mapping, spacing/geometry of the written
NIfTIs, bad-input errors raised before anything is written, and nnU-Net's own integrity check."""
import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semiseg.conversion import cli as convert_cli
from nnunet_semiseg.conversion.acdc import convert_acdc, plan_acdc
from nnunet_semiseg.conversion.common import (ConversionInputError, InputDataError, MissingInputError,
                                              UnknownLayoutError, builtin_list)
from nnunet_semiseg.conversion.la import convert_la, plan_la
from nnunet_semiseg.conversion.mmwhs import convert_mmwhs

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
RNG = np.random.default_rng(0)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnU-Net's three folders under tmp_path; returns (raw, preprocessed)."""
    folders = {}
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        folders[var] = tmp_path / var
        folders[var].mkdir()
        monkeypatch.setenv(var, str(folders[var]))
    return folders['nnUNet_raw'], folders['nnUNet_preprocessed']


def write_itk(array: np.ndarray, path: Path, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    """array [z, y, x] -> file with the given spacing (x, y, z)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def read(path: Path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def folder_counts(dataset: Path) -> dict:
    return {sub.name: len(list(sub.iterdir())) for sub in dataset.iterdir() if sub.is_dir()}


def label_volume(shape, values) -> np.ndarray:
    """A label volume holding every value of ``values`` (blocks along the last axis)."""
    label = np.zeros(shape, dtype=np.uint8 if max(values) < 256 else np.int16)
    for i, v in enumerate(values):
        label[..., i::len(values)] = v
    return label


# ---------------------------------------------------------------------------------------------------------------
# ACDC, official release

ACDC_TRAIN, ACDC_VAL, ACDC_TEST = ['patient099', 'patient038', 'patient050', 'patient100'], ['patient028'], \
    ['patient011']
ACDC_SPACING = (1.4, 1.4, 6.5)


def make_acdc_official(root: Path, patients=ACDC_TRAIN + ACDC_VAL + ACDC_TEST) -> Path:
    for p in patients:
        folder = root / 'training' / p
        folder.mkdir(parents=True)
        (folder / 'Info.cfg').write_text('ED: 1\nES: 7\nGroup: NOR\nHeight: 180\nNbFrame: 20\nWeight: 80\n')
        write_itk(np.zeros((3, 4, 4, 4), np.int16), folder / f'{p}_4d.nii.gz')  # must be ignored
        for frame in (1, 7):
            write_itk(RNG.integers(0, 500, (4, 16, 12)).astype(np.int16), folder / f'{p}_frame{frame:02d}.nii.gz',
                      ACDC_SPACING, origin=(5.0, -3.0, 2.0))
            write_itk(label_volume((4, 16, 12), [0, 1, 2, 3]), folder / f'{p}_frame{frame:02d}_gt.nii.gz',
                      ACDC_SPACING, origin=(5.0, -3.0, 2.0))
    return root


def test_builtin_acdc_lists_are_the_community_split():
    train, val, test = (builtin_list(f'acdc_{r}') for r in ('train', 'val', 'test'))
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert train[:3] == ['patient099', 'patient038', 'patient050']
    assert sorted(train + val + test) == [f'patient{i:03d}' for i in range(1, 101)]


def test_acdc_official(nnunet_env, tmp_path):
    raw, preprocessed = nnunet_env
    out = convert_acdc(make_acdc_official(tmp_path / 'src'), 27, labeled=2)
    assert out == raw / 'Dataset027_ACDC'
    # 2 labelled + 1 validation patients x 2 frames; 2 unlabelled patients x 2 frames; 1 test patient x 2 frames
    assert folder_counts(out) == {'imagesTr': 6, 'labelsTr': 6, 'imagesTrUnlabeled': 4, 'imagesTs': 2,
                                  'labelsTs': 2}
    assert sorted(p.name for p in (out / 'imagesTrUnlabeled').iterdir()) == [
        'patient050_frame01_0000.nii.gz', 'patient050_frame07_0000.nii.gz',
        'patient100_frame01_0000.nii.gz', 'patient100_frame07_0000.nii.gz']
    splits = json.loads((preprocessed / 'Dataset027_ACDC' / 'splits_final.json').read_text())
    assert splits == [{'train': ['patient038_frame01', 'patient038_frame07', 'patient099_frame01',
                                 'patient099_frame07'],
                       'val': ['patient028_frame01', 'patient028_frame07']}]
    dataset_json = json.loads((out / 'dataset.json').read_text())
    assert dataset_json['numTraining'] == 6
    assert dataset_json['labels'] == {'background': 0, 'RV': 1, 'MYO': 2, 'LV': 3}
    image, spacing = read(out / 'imagesTr' / 'patient099_frame07_0000.nii.gz')
    label, label_spacing = read(out / 'labelsTr' / 'patient099_frame07.nii.gz')
    source, _ = read(tmp_path / 'src' / 'training' / 'patient099' / 'patient099_frame07.nii.gz')
    assert np.array_equal(image, source) and image.shape == label.shape == (4, 16, 12)
    assert np.allclose(spacing, ACDC_SPACING) and np.allclose(label_spacing, ACDC_SPACING)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert not (out / 'labelsTr' / 'patient050_frame01.nii.gz').exists()  # no fake labels for unlabelled cases


def test_acdc_official_integrity_check_passes_with_unlabeled_folder(nnunet_env, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    out = convert_acdc(make_acdc_official(tmp_path / 'src'), 27, labeled=1)
    assert (out / 'imagesTrUnlabeled').is_dir()
    verify_dataset_integrity(str(out), num_processes=1)


def test_acdc_official_testing_folder_is_opt_in(nnunet_env, tmp_path):
    src = make_acdc_official(tmp_path / 'src')
    folder = src / 'testing' / 'patient101'
    folder.mkdir(parents=True)
    (folder / 'Info.cfg').write_text('ED: 1\nES: 9\n')
    for frame in (1, 9):  # no ground truth: imagesTs only
        write_itk(np.zeros((4, 16, 12), np.int16), folder / f'patient101_frame{frame:02d}.nii.gz', ACDC_SPACING)
    assert folder_counts(convert_acdc(src, 27, labeled=2))['imagesTs'] == 2
    out = convert_acdc(src, 27, labeled=2, official_test=True, overwrite=True)
    assert folder_counts(out)['imagesTs'] == 4 and folder_counts(out)['labelsTs'] == 2
    assert (out / 'imagesTs' / 'patient101_frame09_0000.nii.gz').is_file()


# ---------------------------------------------------------------------------------------------------------------
# ACDC, community HDF5 layout

def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, 'w') as f:
        f['image'], f['label'] = image, label


def make_acdc_h5(root: Path, with_lists=True) -> dict:
    """Training patients only as 2-D slices (as SSL4MIS ships them) except one, val/test as volumes."""
    volumes = {}
    patients = ['patient099', 'patient038', 'patient050', 'patient028', 'patient011']
    for p in patients:
        for frame in ('frame01', 'frame02'):
            case = f'{p}_{frame}'
            image = RNG.random((5, 16, 12), dtype=np.float32)
            label = label_volume((5, 16, 12), [0, 1, 2, 3])
            volumes[case] = (image, label)
            if p in ('patient099', 'patient038'):
                for k in range(5):
                    write_h5(root / 'data' / 'slices' / f'{case}_slice_{k}.h5', image[k], label[k])
            else:
                write_h5(root / 'data' / f'{case}.h5', image, label)
    if with_lists:
        lists = {'train': patients[:3], 'val': ['patient028'], 'test': ['patient011']}
        for role, ps in lists.items():
            (root / f'{role}.list').write_text(''.join(f'{p}_frame01\n{p}_frame02\n' for p in ps))
    return volumes


def test_acdc_h5_slices_reassembled_with_default_spacing(nnunet_env, tmp_path):
    raw, preprocessed = nnunet_env
    volumes = make_acdc_h5(tmp_path / 'src')
    out = convert_acdc(tmp_path / 'src', 28, labeled=1, name='ACDCh5')
    assert out.name == 'Dataset028_ACDCh5'
    assert folder_counts(out) == {'imagesTr': 4, 'labelsTr': 4, 'imagesTrUnlabeled': 4, 'imagesTs': 2,
                                  'labelsTs': 2}
    splits = json.loads((preprocessed / out.name / 'splits_final.json').read_text())
    assert splits[0]['train'] == ['patient099_frame01', 'patient099_frame02']
    image, spacing = read(out / 'imagesTr' / 'patient099_frame02_0000.nii.gz')  # stacked from 5 slices
    label, _ = read(out / 'labelsTr' / 'patient099_frame02.nii.gz')
    assert np.array_equal(image, volumes['patient099_frame02'][0])
    assert np.array_equal(label, volumes['patient099_frame02'][1])
    assert spacing == pytest.approx((1.5, 1.5, 10.0))
    unlabeled, _ = read(out / 'imagesTrUnlabeled' / 'patient038_frame01_0000.nii.gz')
    assert np.array_equal(unlabeled, volumes['patient038_frame01'][0])


def test_acdc_h5_spacing_option_and_builtin_lists(nnunet_env, tmp_path):
    make_acdc_h5(tmp_path / 'src', with_lists=False)
    plan = plan_acdc(tmp_path / 'src', 29, labeled=2)  # built-in lists: patients in their order there
    assert [c.case_id for c in plan.labeled] == ['patient099_frame01', 'patient099_frame02',
                                                 'patient038_frame01', 'patient038_frame02']
    assert [c.case_id for c in plan.validation] == ['patient028_frame01', 'patient028_frame02']
    out = convert_acdc(tmp_path / 'src', 29, labeled=2, spacing=(1.25, 1.25, 5.0))
    _, spacing = read(out / 'imagesTs' / 'patient011_frame01_0000.nii.gz')
    assert spacing == pytest.approx((1.25, 1.25, 5.0))


def test_acdc_h5_missing_slice_is_reported(nnunet_env, tmp_path):
    make_acdc_h5(tmp_path / 'src')
    (tmp_path / 'src' / 'data' / 'slices' / 'patient038_frame01_slice_2.h5').unlink()
    with pytest.raises(MissingInputError, match=r'slice\(s\) \[2\] of patient038_frame01'):
        convert_acdc(tmp_path / 'src', 30, labeled=1)


# ---------------------------------------------------------------------------------------------------------------
# LA

LA_TRAIN, LA_TEST = builtin_list('la_train')[:5], builtin_list('la_test')[:2]


def make_la_official(root: Path) -> None:
    for scan in LA_TRAIN + LA_TEST:
        write_itk(RNG.integers(0, 255, (6, 10, 8)).astype(np.uint8), root / 'Training Set' / scan / 'lgemri.nrrd',
                  (0.625, 0.625, 0.625))
        write_itk(label_volume((6, 10, 8), [0, 255]), root / 'Training Set' / scan / 'laendo.nrrd',
                  (0.625, 0.625, 0.625))


def test_la_official_maps_255_to_1(nnunet_env, tmp_path):
    raw, preprocessed = nnunet_env
    make_la_official(tmp_path / 'src')
    out = convert_la(tmp_path / 'src', 40, labeled=2)
    # validation = the 2 test scans (default), also in imagesTs
    assert folder_counts(out) == {'imagesTr': 4, 'labelsTr': 4, 'imagesTrUnlabeled': 3, 'imagesTs': 2,
                                  'labelsTs': 2}
    splits = json.loads((preprocessed / 'Dataset040_LA' / 'splits_final.json').read_text())
    assert splits == [{'train': sorted(LA_TRAIN[:2]), 'val': sorted(LA_TEST)}]
    label, spacing = read(out / 'labelsTr' / f'{LA_TRAIN[0]}.nii.gz')
    assert set(np.unique(label)) == {0, 1} and spacing == pytest.approx((0.625,) * 3)


def test_la_h5_axis_order_and_val_option(nnunet_env, tmp_path):
    raw, preprocessed = nnunet_env
    src = tmp_path / 'src'
    arrays = {}
    for scan in LA_TRAIN:
        image_xyz = RNG.random((12, 10, 6), dtype=np.float32)  # [X, Y, Z] as the community files
        label_xyz = (image_xyz > 0.5).astype(np.uint8)
        arrays[scan] = (image_xyz, label_xyz)
        write_h5(src / '2018LA_Seg_Training Set' / scan / 'mri_norm2.h5', image_xyz, label_xyz)
    (src / 'train.list').write_text('\n'.join(LA_TRAIN) + '\n')
    with pytest.raises(ConversionInputError, match='pass --val N'):  # no test list here -> no default validation
        convert_la(src, 41, labeled=2)
    out = convert_la(src, 41, labeled=2, val=1)
    assert folder_counts(out) == {'imagesTr': 3, 'labelsTr': 3, 'imagesTrUnlabeled': 2}
    splits = json.loads((preprocessed / out.name / 'splits_final.json').read_text())
    assert splits == [{'train': sorted(LA_TRAIN[:2]), 'val': [LA_TRAIN[-1]]}]
    image = sitk.ReadImage(str(out / 'imagesTr' / f'{LA_TRAIN[0]}_0000.nii.gz'))
    assert image.GetSize() == (12, 10, 6)  # x, y, z as stored
    assert image.GetSpacing() == pytest.approx((0.625,) * 3)
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), arrays[LA_TRAIN[0]][0])


# ---------------------------------------------------------------------------------------------------------------
# MM-WHS

MMWHS_VALUES = [0, 205, 420, 500, 550, 600, 820, 850]


def make_mmwhs(root: Path) -> None:
    for number in range(1001, 1021):
        write_itk(RNG.integers(-1000, 1000, (4, 8, 8)).astype(np.int16),
                  root / 'ct_train' / f'ct_train_{number}_image.nii.gz', (0.4, 0.4, 0.6))
        write_itk(label_volume((4, 8, 8), MMWHS_VALUES), root / 'ct_train' / f'ct_train_{number}_label.nii.gz',
                  (0.4, 0.4, 0.6))


def test_mmwhs_label_mapping_and_arco_budgets(nnunet_env, tmp_path):
    raw, preprocessed = nnunet_env
    make_mmwhs(tmp_path / 'src')
    out = convert_mmwhs(tmp_path / 'src', 50, labeled=1, num_processes=2)
    assert folder_counts(out) == {'imagesTr': 6, 'labelsTr': 6, 'imagesTrUnlabeled': 14, 'imagesTs': 5,
                                  'labelsTs': 5}
    splits = json.loads((preprocessed / out.name / 'splits_final.json').read_text())
    assert splits[0]['train'] == ['ct_train_1018']
    assert splits[0]['val'] == sorted(['ct_train_1002', 'ct_train_1001', 'ct_train_1008', 'ct_train_1015',
                                       'ct_train_1014'])
    label, spacing = read(out / 'labelsTr' / 'ct_train_1018.nii.gz')
    source, _ = read(tmp_path / 'src' / 'ct_train' / 'ct_train_1018_label.nii.gz')
    for raw_value, mapped in zip(MMWHS_VALUES, range(8)):
        assert np.all(label[source == raw_value] == mapped)
    assert label.dtype == np.uint8 and spacing == pytest.approx((0.4, 0.4, 0.6))
    assert json.loads((out / 'dataset.json').read_text())['channel_names'] == {'0': 'CT'}

    out = convert_mmwhs(tmp_path / 'src', 50, labeled=2, overwrite=True)
    assert json.loads((preprocessed / out.name / 'splits_final.json').read_text())[0]['train'] == [
        'ct_train_1004', 'ct_train_1018']
    out = convert_mmwhs(tmp_path / 'src', 50, labeled=3, val=2, overwrite=True)
    split = json.loads((preprocessed / out.name / 'splits_final.json').read_text())[0]
    # first 3 of ARCO's train_all; validation = its last 2 non-labelled volumes (1011, 1004)
    assert split == {'train': ['ct_train_1003', 'ct_train_1005', 'ct_train_1017'],
                     'val': ['ct_train_1004', 'ct_train_1011']}
    assert folder_counts(out)['imagesTrUnlabeled'] == 10


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written

def assert_nothing_written(raw: Path, preprocessed: Path) -> None:
    assert list(raw.iterdir()) == [] and list(preprocessed.iterdir()) == []


def test_missing_label_file(nnunet_env, tmp_path):
    make_acdc_official(tmp_path / 'src')
    (tmp_path / 'src' / 'training' / 'patient050' / 'patient050_frame07_gt.nii.gz').unlink()
    with pytest.raises(MissingInputError, match='patient050_frame07_gt.nii.gz does not exist'):
        convert_acdc(tmp_path / 'src', 27, labeled=2)
    assert_nothing_written(*nnunet_env)


def test_label_values_outside_the_expected_set(nnunet_env, tmp_path):
    make_mmwhs(tmp_path / 'src')
    write_itk(label_volume((4, 8, 8), [0, 205, 421]), tmp_path / 'src' / 'ct_train' / 'ct_train_1018_label.nii.gz',
              (0.4, 0.4, 0.6))
    with pytest.raises(ConversionInputError, match=r'ct_train_1018_image.nii.gz / ct_train_1018_label.nii.gz: '
                                                   r'unexpected label values \[421\]'):
        convert_mmwhs(tmp_path / 'src', 51, labeled=2)
    assert_nothing_written(*nnunet_env)
    out = convert_mmwhs(tmp_path / 'src', 51, labeled=2, value_aliases={421: 420})  # the documented escape hatch
    label, _ = read(out / 'labelsTr' / 'ct_train_1018.nii.gz')
    assert set(np.unique(label)) == {0, 1, 2}  # 205 -> MYO (1), 421 read as 420 -> LA (2)


def test_nan_intensities(nnunet_env, tmp_path):
    src = tmp_path / 'src'
    for scan in LA_TRAIN[:3]:
        image = np.ones((6, 6, 4), np.float32)
        if scan == LA_TRAIN[2]:
            image[0, 0, 0] = np.nan
        write_h5(src / '2018LA_Seg_Training Set' / scan / 'mri_norm2.h5', image, np.zeros((6, 6, 4), np.uint8))
    with pytest.raises(ConversionInputError, match=f'{LA_TRAIN[2]}/mri_norm2.h5: the image contains NaN'):
        convert_la(src, 45, labeled=1, val=1)
    assert_nothing_written(*nnunet_env)


def test_geometry_mismatch(nnunet_env, tmp_path):
    make_la_official(tmp_path / 'src')
    write_itk(label_volume((6, 10, 8), [0, 255]), tmp_path / 'src' / 'Training Set' / LA_TRAIN[1] / 'laendo.nrrd',
              (0.625, 0.625, 1.25))
    with pytest.raises(ConversionInputError, match='spacing'):
        convert_la(tmp_path / 'src', 42, labeled=2)
    write_itk(label_volume((6, 10, 9), [0, 255]), tmp_path / 'src' / 'Training Set' / LA_TRAIN[1] / 'laendo.nrrd',
              (0.625, 0.625, 0.625))
    with pytest.raises(ConversionInputError, match=f'{LA_TRAIN[1]}.*size'):
        convert_la(tmp_path / 'src', 42, labeled=2)
    assert_nothing_written(*nnunet_env)


def test_unknown_layout_and_budget_too_large(nnunet_env, tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UnknownLayoutError, match='no ACDC layout found'):
        convert_acdc(tmp_path / 'empty', 27, labeled=3)
    make_acdc_official(tmp_path / 'src')
    with pytest.raises(ConversionInputError, match='--labeled 5 is impossible: 4 training patients'):
        convert_acdc(tmp_path / 'src', 27, labeled=5)
    assert_nothing_written(*nnunet_env)


def test_existing_output_needs_overwrite(nnunet_env, tmp_path):
    raw, _ = nnunet_env
    make_acdc_official(tmp_path / 'src')
    convert_acdc(tmp_path / 'src', 27, labeled=1)
    with pytest.raises(ConversionInputError, match='pass --overwrite'):
        convert_acdc(tmp_path / 'src', 27, labeled=2)
    with pytest.raises(ConversionInputError, match='already used by'):
        convert_acdc(tmp_path / 'src', 27, labeled=2, name='Other')
    convert_acdc(tmp_path / 'src', 27, labeled=2, overwrite=True)
    assert len(list((raw / 'Dataset027_ACDC' / 'imagesTrUnlabeled').iterdir())) == 4


def test_unset_nnunet_raw(monkeypatch, tmp_path):
    monkeypatch.delenv('nnUNet_raw', raising=False)
    monkeypatch.setenv('nnUNet_preprocessed', str(tmp_path))
    make_acdc_official(tmp_path / 'src')
    with pytest.raises(ConversionInputError, match='nnUNet_raw is not set'):
        convert_acdc(tmp_path / 'src', 27, labeled=1)


def test_cli_prints_one_line_error(nnunet_env, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    convert_cli.add_parser(parser.add_subparsers(dest='command'))
    (tmp_path / 'empty').mkdir()
    args = parser.parse_args(['convert', 'la', str(tmp_path / 'empty'), '-d', '43', '--labeled', '4', '-np', '1'])
    assert args.func(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('nnunet-semiseg convert la: error:') and 'no LA layout found' in err
    assert '\n' not in err
    assert issubclass(UnknownLayoutError, InputDataError)


# ---------------------------------------------------------------------------------------------------------------
# the real development subsets (../shared/data), skipped in a fresh clone

def require_shared(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f'{folder} is absent (development data shipped beside the repository, not in a clone)')
    return folder


def test_real_acdc_h5_conversion(nnunet_env):
    raw, preprocessed = nnunet_env
    src = require_shared('acdc_h5_dev')
    out = convert_acdc(src, 27, labeled=3, num_processes=1)
    # 12 training patients: 3 labelled (6 frames) + 9 unlabelled (18 frames); 4 validation patients (8 frames)
    assert folder_counts(out) == {'imagesTr': 14, 'labelsTr': 14, 'imagesTrUnlabeled': 18}
    split = json.loads((preprocessed / out.name / 'splits_final.json').read_text())[0]
    assert {c.split('_')[0] for c in split['train']} == {'patient099', 'patient038', 'patient050'}
    assert len(split['val']) == 8
    with h5py.File(src / 'data' / 'patient099_frame01.h5', 'r') as f:
        source_label = f['label'][()]
    label, spacing = read(out / 'labelsTr' / 'patient099_frame01.nii.gz')
    assert np.array_equal(label, source_label) and spacing == pytest.approx((1.5, 1.5, 10.0))


def test_real_la_h5_plan(nnunet_env):
    src = require_shared('la_h5_dev')
    plan = plan_la(src, 44, labeled=4, val=2)
    assert (len(plan.labeled), len(plan.unlabeled), len(plan.validation), len(plan.test)) == (4, 6, 2, 0)
    assert [c.case_id for c in plan.labeled] == builtin_list('la_train')[:4]
    image, label = plan.labeled[0].load(with_label=True)
    assert image.GetSize() == label.GetSize() and image.GetSize()[2] == 88  # [X, Y, Z] stored, z = 88 slices
    assert image.GetSpacing() == pytest.approx((0.625,) * 3)
