"""2018 Left Atrium challenge -> nnU-Net raw dataset with a label budget (same as ``nnunet-semiseg convert la``).

    python dataset_conversion/convert_la.py /data/LA -d 28 --labeled 8

The code lives in ``nnunet_semiseg.conversion.la``; see docs/datasets.md."""
import sys

from nnunet_semiseg.cli import main

if __name__ == '__main__':
    # the same arguments as `nnunet-semiseg convert la` (one parser, in nnunet_semiseg/conversion/cli.py)
    sys.exit(main(['convert', 'la', *sys.argv[1:]]))
