"""Inverse of ``pack.py``: ``python unpack.py DEST PART [PART ...]`` writes every packed image back under DEST as
.nii.gz, with bit-identical voxels, spacing, origin and direction."""
import lzma
import os
import pickle
import sys

import SimpleITK as sitk


def unpack(dest: str, parts) -> int:
    n = 0
    for part in parts:
        with open(part, 'rb') as fh:
            items = pickle.loads(lzma.decompress(fh.read()))
        for item in items:
            image = sitk.GetImageFromArray(item['values'][item['index']])
            image.SetSpacing(item['spacing'])
            image.SetOrigin(item['origin'])
            image.SetDirection(item['direction'])
            out = os.path.join(dest, item['rel'])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            sitk.WriteImage(image, out, useCompression=True)
            n += 1
    return n


if __name__ == '__main__':
    print(f'unpacked {unpack(sys.argv[1], sys.argv[2:])} images into {sys.argv[1]}')
