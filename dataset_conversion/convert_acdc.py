"""ACDC -> nnU-Net raw dataset with a label budget (same as ``nnunet-semiseg convert acdc``).

    python dataset_conversion/convert_acdc.py /data/ACDC -d 27 --labeled 3

The code lives in ``nnunet_semiseg.conversion.acdc``; see docs/datasets.md."""
import argparse

from nnunet_semiseg.conversion.common import InputDataError
from nnunet_semiseg.conversion.acdc import convert_acdc

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='ACDC folder: official release (training/) or community HDF5 layout (data/)')
    parser.add_argument('-d', '--dataset-id', type=int, required=True)
    parser.add_argument('--labeled', type=int, required=True, help='labelled training patients (3 and 7 are usual)')
    parser.add_argument('--name', default='ACDC')
    parser.add_argument('--spacing', type=float, nargs=3, metavar=('X', 'Y', 'Z'),
                        help='mm, HDF5 layout only (default 1.5 1.5 10)')
    parser.add_argument('--official-test', action='store_true', help='also convert the official testing/ patients')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('-np', '--num-processes', type=int, default=2)
    args = parser.parse_args()
    try:
        convert_acdc(args.src, args.dataset_id, args.labeled, name=args.name, spacing=args.spacing,
                     official_test=args.official_test, overwrite=args.overwrite, num_processes=args.num_processes)
    except InputDataError as error:
        raise SystemExit(f'error: {error}')
