"""MM-WHS -> nnU-Net raw dataset with ARCO's split and a label budget (same as ``nnunet-semiseg convert mmwhs``).

    python dataset_conversion/convert_mmwhs.py /data/MMWHS -d 29 --labeled 1

The code lives in ``nnunet_semiseg.conversion.mmwhs``; see docs/datasets.md."""
import sys

from nnunet_semiseg.cli import main

if __name__ == '__main__':
    # the same arguments as `nnunet-semiseg convert mmwhs` (one parser, in nnunet_semiseg/conversion/cli.py)
    sys.exit(main(['convert', 'mmwhs', *sys.argv[1:]]))
