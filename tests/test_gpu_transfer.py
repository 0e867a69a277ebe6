"""benchmarks/gpu/pack.py + unpack.py: the transfer that carried real ACDC to the GPU machine must be lossless."""
import os

import numpy as np
import pytest

sitk = pytest.importorskip('SimpleITK')


def _write(path, array, spacing):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((1.5, -2.0, 7.25))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path, useCompression=True)


def test_pack_unpack_is_bit_identical(tmp_path, load_script):
    pack = load_script('benchmarks/gpu/pack.py')
    unpack = load_script('benchmarks/gpu/unpack.py')
    rng = np.random.default_rng(0)
    root = tmp_path / 'raw'
    # [0, 1]-scaled intensities with a few hundred distinct values, as the ACDC HDF5 release stores them
    arrays = {'imagesTr/a_0000.nii.gz': (rng.integers(0, 700, (4, 12, 10)) / 699).astype(np.float32),
              'imagesTrUnlabeled/b_0000.nii.gz': (rng.integers(0, 50, (3, 8, 9)) / 49).astype(np.float32)}
    for rel, array in arrays.items():
        _write(str(root / rel), array, (1.5, 1.5, 10.0))
    pack.pack(str(root), ['imagesTr/a_0000.nii.gz'], str(tmp_path / 'A.xz'))
    pack.pack(str(root), ['imagesTrUnlabeled/b_0000.nii.gz'], str(tmp_path / 'B.xz'))
    assert unpack.unpack(str(tmp_path / 'out'), [str(tmp_path / 'A.xz'), str(tmp_path / 'B.xz')]) == 2
    for rel, array in arrays.items():
        back = sitk.ReadImage(str(tmp_path / 'out' / rel))
        assert np.array_equal(sitk.GetArrayFromImage(back), array)
        assert sitk.GetArrayFromImage(back).dtype == np.float32
        assert back.GetSpacing() == (1.5, 1.5, 10.0) and back.GetOrigin() == (1.5, -2.0, 7.25)


def test_pack_refuses_too_many_distinct_values(tmp_path, load_script):
    pack = load_script('benchmarks/gpu/pack.py')
    array = np.arange(2 ** 16, dtype=np.float32).reshape(16, 64, 64) / 2 ** 16
    _write(str(tmp_path / 'imagesTr' / 'c_0000.nii.gz'), array, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match='c_0000.nii.gz: 65536 distinct values'):
        pack.pack(str(tmp_path), ['imagesTr/c_0000.nii.gz'], str(tmp_path / 'C.xz'))
