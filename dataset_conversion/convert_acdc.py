"""ACDC -> nnU-Net raw dataset with a label budget (same as ``nnunet-semiseg convert acdc``).

    python dataset_conversion/convert_acdc.py /data/ACDC -d 27 --labeled 3

The code lives in ``nnunet_semiseg.conversion.acdc``; see docs/datasets.md."""
import sys

from nnunet_semiseg.cli import main

if __name__ == '__main__':
    # the same arguments as `nnunet-semiseg convert acdc` (one parser, in nnunet_semiseg/conversion/cli.py)
    sys.exit(main(['convert', 'acdc', *sys.argv[1:]]))
