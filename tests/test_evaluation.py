"""``evaluate``: Dice/Jaccard exact, HD95/ASD exact in mm on shapes with known distances and anisotropic spacing,
ASD direction, empty-mask conventions, label defaults, bad input."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semiseg import evaluation
from nnunet_semiseg.evaluation import EvaluationInputError, binary_metrics, evaluate_folder

# numpy axis order [z, y, x]: 3 mm between slices, 1 mm in plane
SPACING_ZYX = (3.0, 1.0, 1.0)


def write_seg(array: np.ndarray, path: Path, spacing_zyx=SPACING_ZYX) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK wants (x, y, z)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def cube(shape, z, y, x, size=4, value=1) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    volume[z:z + size, y:y + size, x:x + size] = value
    return volume


def test_cubes_offset_by_one_slice(tmp_path):
    """Reference cube 4^3 voxels; prediction shifted by one voxel along z (3 mm).

    Overlap 3 of 4 slices: Dice = 2*48/128 = 0.75, Jaccard = 48/80 = 0.6. Of the prediction's 56 surface voxels,
    36 lie on the reference surface (0 mm), the 4 interior voxels of its bottom face are 1 mm (in plane) from the
    reference's side faces, its 16 top-face voxels are one slice (3 mm) above the reference's top face:
    ASD = (4*1 + 16*3) / 56 = 13/14 mm. The reverse direction is symmetric, so the pooled 112 distances hold
    32 threes above the 95th-percentile rank (105.45): HD95 = 3 mm (1 mm if the slice spacing were ignored)."""
    shape = (10, 10, 10)
    write_seg(cube(shape, 2, 2, 2), tmp_path / 'gt' / 'case1.nii.gz')
    write_seg(cube(shape, 3, 2, 2), tmp_path / 'pred' / 'case1.nii.gz')
    summary = evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', tmp_path / 'summary.json')
    metrics = summary['metric_per_case'][0]['metrics']['1']
    assert metrics['dice'] == 0.75 and metrics['jaccard'] == 0.6
    assert metrics['hd95'] == pytest.approx(3.0, abs=1e-12)
    assert metrics['asd'] == pytest.approx(13 / 14, abs=1e-12)
    assert summary['metric_per_case'][0]['spacing'] == list(SPACING_ZYX)  # numpy order, from the reference file
    written = json.loads((tmp_path / 'summary.json').read_text())
    assert set(written['mean']) == {'1'}
    assert written['mean']['1']['dice'] == 0.75 and written['mean']['1']['asd'] == pytest.approx(13 / 14)


def test_asd_goes_from_prediction_to_reference():
    """Prediction = reference cube + one stray voxel 7 voxels (7 mm in x) beyond the cube's face.

    Prediction -> reference: 56 surface voxels at 0 mm and the stray voxel at 7 mm: ASD = 7/57 mm, while the
    reverse direction would be 0. HD95 pools 113 distances with a single 7: the 95th percentile is 0.
    Dice = 2*64/129, Jaccard = 64/65."""
    reference = cube((10, 10, 16), 2, 2, 2).astype(bool)
    prediction = reference.copy()
    prediction[2, 2, 12] = True
    m = binary_metrics(prediction, reference, SPACING_ZYX)
    assert m['asd'] == pytest.approx(7 / 57, abs=1e-12)
    assert binary_metrics(reference, prediction, SPACING_ZYX)['asd'] == 0
    assert m['hd95'] == 0
    assert m['dice'] == pytest.approx(128 / 129) and m['jaccard'] == pytest.approx(64 / 65)


def test_empty_mask_conventions():
    empty, full = np.zeros((4, 6, 6), bool), cube((4, 6, 6), 0, 1, 1, size=3).astype(bool)
    both_empty = binary_metrics(empty, empty, SPACING_ZYX)
    assert all(math.isnan(both_empty[k]) for k in ('dice', 'jaccard', 'hd95', 'asd'))
    for prediction, reference in ((empty, full), (full, empty)):
        one_empty = binary_metrics(prediction, reference, SPACING_ZYX)
        assert one_empty['dice'] == 0 and one_empty['jaccard'] == 0
        assert math.isnan(one_empty['hd95']) and math.isnan(one_empty['asd'])


def test_labels_default_means_and_missed_structures(tmp_path):
    """Label 2 exists in case a only and is missed there; case b has no label 2 anywhere (both empty: NaN,
    excluded from the mean); a spurious predicted label 3 is not evaluated (not in any reference)."""
    shape = (8, 12, 12)
    write_seg(cube(shape, 1, 1, 1) + cube(shape, 1, 7, 7, value=2), tmp_path / 'gt' / 'a.nii.gz')
    write_seg(cube(shape, 1, 1, 1) + cube(shape, 1, 7, 1, size=2, value=3), tmp_path / 'pred' / 'a.nii.gz')
    write_seg(cube(shape, 2, 2, 2), tmp_path / 'gt' / 'b.nii.gz')
    write_seg(cube(shape, 2, 2, 2), tmp_path / 'pred' / 'b.nii.gz')
    summary = evaluate_folder(tmp_path / 'pred', tmp_path / 'gt')
    assert summary['labels'] == [1, 2]
    assert summary['mean']['1'] == {'dice': 1.0, 'jaccard': 1.0, 'hd95': 0.0, 'asd': 0.0, 'n_cases': 2,
                                    'n_distance_undefined': 0}
    label2 = summary['mean']['2']
    assert label2['dice'] == 0 and math.isnan(label2['hd95']) and label2['n_cases'] == 1
    assert label2['n_distance_undefined'] == 1
    assert math.isnan(summary['metric_per_case'][1]['metrics']['2']['dice'])
    assert summary['foreground_mean']['dice'] == 0.5
    # labels from dataset.json, or given explicitly
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': {'background': 0, 'a': 1, 'b': 2, 'c': 3},
                                                       'file_ending': '.nii.gz'}))
    assert evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', dataset_json_file=tmp_path / 'dataset.json')[
        'labels'] == [1, 2, 3]
    assert list(evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', labels=[3])['mean']) == ['3']


def test_bad_input(tmp_path):
    write_seg(cube((6, 8, 8), 1, 1, 1), tmp_path / 'gt' / 'a.nii.gz')
    write_seg(cube((6, 8, 8), 1, 1, 1), tmp_path / 'gt' / 'b.nii.gz')
    write_seg(cube((6, 8, 9), 1, 1, 1), tmp_path / 'pred' / 'a.nii.gz')
    with pytest.raises(EvaluationInputError, match='no prediction .* b.nii.gz; predict them or pass --chill'):
        evaluate_folder(tmp_path / 'pred', tmp_path / 'gt')
    with pytest.raises(EvaluationInputError, match=r'a.nii.gz: shape \(6, 8, 9\) differs'):
        evaluate_folder(tmp_path / 'pred', tmp_path / 'gt', chill=True)


def test_cli_writes_summary_and_prints_table(tmp_path, capsys):
    write_seg(cube((10, 10, 10), 2, 2, 2), tmp_path / 'gt' / 'case1.nii.gz')
    write_seg(cube((10, 10, 10), 3, 2, 2), tmp_path / 'pred' / 'case1.nii.gz')
    parser = argparse.ArgumentParser()
    evaluation.add_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['evaluate', str(tmp_path / 'pred'), str(tmp_path / 'gt'), '-o',
                              str(tmp_path / 'out' / 'summary.json'), '-l', '1', '-np', '1'])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert '0.7500' in out and '3.000' in out and '0.929' in out
    assert json.loads((tmp_path / 'out' / 'summary.json').read_text())['mean']['1']['hd95'] == 3.0
