"""``split``: a label-budget copy of an nnU-Net raw dataset, groups kept together, reproducible, source untouched."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semiseg.conversion import split as split_module
from nnunet_semiseg.conversion.common import ConversionInputError, MissingInputError
from nnunet_semiseg.conversion.split import make_label_budget_split

PATIENTS = [f'patient{i:03d}' for i in range(1, 7)]
CASES = [f'{p}_frame{f}' for p in PATIENTS for f in ('01', '12')]


@pytest.fixture
def source(tmp_path, monkeypatch) -> Path:
    """Dataset100_Src: 12 labelled cases (6 patients x 2 frames, 2 channels), 2 unlabelled, 1 test case."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    folder = tmp_path / 'nnUNet_raw' / 'Dataset100_Src'

    def write(relative: str, value: int) -> None:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 4, 4), value, np.uint8)), str(folder / relative))

    for i, case in enumerate(CASES):
        write(f'imagesTr/{case}_0000.nii.gz', i)
        write(f'imagesTr/{case}_0001.nii.gz', i)
        write(f'labelsTr/{case}.nii.gz', 1)
    write('imagesTrUnlabeled/extra001_0000.nii.gz', 0)
    write('imagesTrUnlabeled/extra001_0001.nii.gz', 0)
    write('imagesTs/test001_0000.nii.gz', 0)
    write('imagesTs/test001_0001.nii.gz', 0)
    write('labelsTs/test001.nii.gz', 0)
    (folder / 'dataset.json').write_text(json.dumps({
        'channel_names': {'0': 'T1', '1': 'T2'}, 'labels': {'background': 0, 'thing': 1}, 'numTraining': 12,
        'file_ending': '.nii.gz', 'reference': 'kept'}))
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob('*')}


def names(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_patients_kept_together_and_rest_unlabelled(source):
    before = snapshot(source)
    out = make_label_budget_split(100, 101, labeled=2, group_by=r'^(patient\d+)', seed=3)
    assert out.name == 'Dataset101_Src_2labeled'
    labelled = names(out / 'labelsTr')
    assert len(labelled) == 4 and len({n.split('_')[0] for n in labelled}) == 2  # 2 patients, both frames
    assert len(names(out / 'imagesTr')) == 8  # 2 channels
    unlabelled = names(out / 'imagesTrUnlabeled')
    assert len(unlabelled) == (8 + 1) * 2 and 'extra001_0000.nii.gz' in unlabelled
    assert not {n.split('_')[0] for n in labelled} & {n.split('_')[0] for n in unlabelled}
    assert names(out / 'imagesTs') == ['test001_0000.nii.gz', 'test001_0001.nii.gz']
    assert names(out / 'labelsTs') == ['test001.nii.gz']
    dataset_json = json.loads((out / 'dataset.json').read_text())
    assert dataset_json['numTraining'] == 4 and dataset_json['reference'] == 'kept'
    assert dataset_json['channel_names'] == {'0': 'T1', '1': 'T2'}
    assert snapshot(source) == before  # the source is only read


def test_reproducible_under_seed(source):
    first = names(make_label_budget_split(100, 102, labeled=3, seed=7) / 'labelsTr')
    second = names(make_label_budget_split(100, 103, labeled=3, seed=7) / 'labelsTr')
    assert first == second and len(first) == 3
    draws = {tuple(names(make_label_budget_split(100, 104, labeled=3, seed=s, overwrite=True) / 'labelsTr'))
             for s in range(4)}
    assert len(draws) > 1  # different seeds draw different cases (4 seeds, C(12,3)=220 possible draws)


def test_val_groups_write_splits_final(source, tmp_path):
    out = make_label_budget_split(100, 105, labeled=1, val=2, group_by=r'^(patient\d+)', seed=0)
    split = json.loads((tmp_path / 'nnUNet_preprocessed' / out.name / 'splits_final.json').read_text())
    assert len(split) == 1 and len(split[0]['train']) == 2 and len(split[0]['val']) == 4
    assert sorted(split[0]['train'] + split[0]['val']) == [n[:-len('.nii.gz')] for n in names(out / 'labelsTr')]
    assert len(names(out / 'imagesTrUnlabeled')) == (6 + 1) * 2


def test_bad_arguments(source):
    with pytest.raises(ConversionInputError, match='--labeled 7 .* 6 groups'):
        make_label_budget_split(100, 106, labeled=7, group_by=r'^(patient\d+)')
    with pytest.raises(ConversionInputError, match='does not match --group-by'):
        make_label_budget_split(100, 106, labeled=1, group_by=r'^(case\d+)')
    with pytest.raises(ConversionInputError, match='not a valid regular expression'):
        make_label_budget_split(100, 106, labeled=1, group_by=r'^(patient')
    with pytest.raises(ConversionInputError, match='source dataset'):
        make_label_budget_split(100, 100, labeled=1)
    with pytest.raises(MissingInputError, match='Dataset099_'):
        make_label_budget_split(99, 106, labeled=1)
    (source / 'labelsTr' / 'patient004_frame12.nii.gz').unlink()
    with pytest.raises(MissingInputError, match='patient004_frame12.nii.gz .* does not exist'):
        make_label_budget_split(100, 106, labeled=1)
    assert not any(p.name.startswith('Dataset106') for p in source.parent.iterdir())


def test_existing_output_and_cli(source, capsys):
    parser = argparse.ArgumentParser()
    split_module.add_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['split', '-d', '100', '-o', '107', '--labeled', '2', '--group-by', r'^(patient\d+)'])
    assert args.func(args) == 0
    assert args.func(args) == 1  # exists, no --overwrite
    err = capsys.readouterr().err.strip()
    assert 'pass --overwrite' in err and '\n' not in err
