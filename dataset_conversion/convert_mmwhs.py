"""MM-WHS -> nnU-Net raw dataset with ARCO's split and a label budget (same as ``nnunet-semiseg convert mmwhs``).

    python dataset_conversion/convert_mmwhs.py /data/MMWHS -d 29 --labeled 1

The code lives in ``nnunet_semiseg.conversion.mmwhs``; see docs/datasets.md."""
import argparse

from nnunet_semiseg.conversion.common import InputDataError
from nnunet_semiseg.conversion.mmwhs import convert_mmwhs, parse_value_aliases

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='MM-WHS folder holding ct_train/ (or mr_train/)')
    parser.add_argument('-d', '--dataset-id', type=int, required=True)
    parser.add_argument('--labeled', type=int, required=True,
                        help='labelled volumes: 1 = ARCO train_5_, 2 = train_10_, else first N of train_all')
    parser.add_argument('--name', default='MMWHS')
    parser.add_argument('--modality', choices=('ct', 'mr'), default='ct')
    parser.add_argument('--val', type=int, metavar='N',
                        help='hold out the last N unlabelled training volumes as validation (default: the test set)')
    parser.add_argument('--map-value', action='append', metavar='RAW=VALUE', help='accept a stray label value')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('-np', '--num-processes', type=int, default=2)
    args = parser.parse_args()
    try:
        convert_mmwhs(args.src, args.dataset_id, args.labeled, name=args.name, modality=args.modality, val=args.val,
                      value_aliases=parse_value_aliases(args.map_value), overwrite=args.overwrite,
                      num_processes=args.num_processes)
    except InputDataError as error:
        raise SystemExit(f'error: {error}')
