"""2018 Left Atrium challenge -> nnU-Net raw dataset with a label budget (same as ``nnunet-semiseg convert la``).

    python dataset_conversion/convert_la.py /data/LA -d 28 --labeled 8

The code lives in ``nnunet_semiseg.conversion.la``; see docs/datasets.md."""
import argparse

from nnunet_semiseg.conversion.common import InputDataError
from nnunet_semiseg.conversion.la import convert_la

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='LA folder: "Training Set" (release) or "2018LA_Seg_Training Set" + lists')
    parser.add_argument('-d', '--dataset-id', type=int, required=True)
    parser.add_argument('--labeled', type=int, required=True, help='labelled training scans (4 and 8 are usual)')
    parser.add_argument('--name', default='LA')
    parser.add_argument('--val', type=int, metavar='N',
                        help='hold out the last N unlabelled training scans as validation (default: the test scans)')
    parser.add_argument('--spacing', type=float, nargs=3, metavar=('X', 'Y', 'Z'),
                        help='mm, HDF5 layout only (default 0.625 0.625 0.625)')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('-np', '--num-processes', type=int, default=2)
    args = parser.parse_args()
    try:
        convert_la(args.src, args.dataset_id, args.labeled, name=args.name, val=args.val, spacing=args.spacing,
                   overwrite=args.overwrite, num_processes=args.num_processes)
    except InputDataError as error:
        raise SystemExit(f'error: {error}')
