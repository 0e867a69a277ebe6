"""Lossless packing of an nnU-Net raw dataset's images for a size-limited transfer (benchmarks/gpu/README.md).

Each image is stored as its sorted distinct values (float32) and uint16 indices into them, with its geometry, and
each part is xz-compressed. ACDC's [0, 1]-scaled intensities have < 3000 distinct values per frame, so the parts
are 35 % smaller than the .nii.gz files themselves (which xz cannot shrink). ``unpack.py`` writes them back.

    python benchmarks/gpu/pack.py $nnUNet_raw/Dataset027_ACDC partA.xz partB.xz 26   # first 26 images -> partA
"""
import glob
import lzma
import os
import pickle
import sys

import numpy as np
import SimpleITK as sitk


def pack(root: str, files, dest: str) -> None:
    """Pack ``files`` (paths relative to ``root``) into ``dest``. Refuses images with 65,536 distinct values or
    more, whose indices would not fit uint16."""
    items = []
    for rel in files:
        image = sitk.ReadImage(os.path.join(root, rel))
        array = sitk.GetArrayFromImage(image)
        values, index = np.unique(array, return_inverse=True)
        if values.size >= 2 ** 16:
            raise ValueError(f'{rel}: {values.size} distinct values, too many to pack losslessly as uint16 indices')
        items.append(dict(rel=rel, values=values, index=index.astype(np.uint16).reshape(array.shape),
                          spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=image.GetDirection()))
    with open(dest, 'wb') as fh:
        fh.write(lzma.compress(pickle.dumps(items, protocol=4), preset=6))


def main():
    root, first, second, n_first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    files = [os.path.relpath(f, root) for pattern in ('imagesTr', 'imagesTrUnlabeled')
             for f in sorted(glob.glob(os.path.join(root, pattern, '*.nii.gz')))]
    pack(root, files[:n_first], first)
    pack(root, files[n_first:], second)
    print(f'{len(files)} images: {os.path.getsize(first) / 2 ** 20:.1f} MiB + {os.path.getsize(second) / 2 ** 20:.1f} MiB')


if __name__ == '__main__':
    main()
