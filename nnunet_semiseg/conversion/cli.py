"""``nnunet-semiseg convert {acdc,la,mmwhs} SRC -d ID --labeled N [...]``: the converters on the command line.

The converters themselves (``nnunet_semiseg.conversion.{acdc,la,mmwhs}``) are imported when the command runs, so
that ``nnunet-semiseg --help`` stays fast."""
import argparse
import os
import sys

from nnunet_semiseg.conversion.common import InputDataError


def _default_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _add_common(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument('src', help='folder of the downloaded dataset (layout detected automatically)')
    parser.add_argument('-d', '--dataset-id', type=int, required=True, help='nnU-Net dataset ID (1-999)')
    parser.add_argument('--labeled', type=int, required=True,
                        help='label budget: number of labelled training patients/scans/volumes')
    parser.add_argument('--name', default=default_name,
                        help=f'dataset name: DatasetID_NAME (default {default_name})')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output dataset folder and splits_final.json')
    parser.add_argument('-np', '--num-processes', type=int, default=_default_processes(),
                        help='worker processes for checking and writing (default min(4, CPU count))')


def _run(args: argparse.Namespace) -> int:
    try:
        if args.dataset == 'acdc':
            from nnunet_semiseg.conversion.acdc import convert_acdc
            convert_acdc(args.src, args.dataset_id, args.labeled, name=args.name, spacing=args.spacing,
                         official_test=args.official_test, overwrite=args.overwrite,
                         num_processes=args.num_processes)
        elif args.dataset == 'la':
            from nnunet_semiseg.conversion.la import convert_la
            convert_la(args.src, args.dataset_id, args.labeled, name=args.name, val=args.val, spacing=args.spacing,
                       overwrite=args.overwrite, num_processes=args.num_processes)
        else:
            from nnunet_semiseg.conversion.mmwhs import convert_mmwhs, parse_value_aliases
            convert_mmwhs(args.src, args.dataset_id, args.labeled, name=args.name, modality=args.modality,
                          val=args.val, value_aliases=parse_value_aliases(args.map_value), overwrite=args.overwrite,
                          num_processes=args.num_processes)
    except InputDataError as error:
        print(f'nnunet-semiseg convert {args.dataset}: error: {error}', file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    """Register ``convert`` with one sub-command per dataset."""
    convert = subparsers.add_parser(
        'convert', help='convert ACDC, LA or MM-WHS into an nnU-Net dataset with a label budget',
        description='Convert a public benchmark into $nnUNet_raw/DatasetID_Name (imagesTr/labelsTr: labelled and '
                    'validation cases, imagesTrUnlabeled: unlabelled images, imagesTs/labelsTs: test cases) and '
                    'write fold 0 of $nnUNet_preprocessed/DatasetID_Name/splits_final.json (train = the labelled '
                    'budget, val = the validation cases). See docs/datasets.md.')
    datasets = convert.add_subparsers(dest='dataset', metavar='DATASET', required=True)

    acdc = datasets.add_parser('acdc', help='ACDC cine MRI (official release or community HDF5 layout)',
                               description='ACDC: the community 70/10/20 patient split; labelled = the first N '
                                           'training patients, both frames.')
    _add_common(acdc, 'ACDC')
    acdc.add_argument('--spacing', type=float, nargs=3, metavar=('X', 'Y', 'Z'),
                      help='voxel spacing in mm written for HDF5 sources, which store none (default 1.5 1.5 10)')
    acdc.add_argument('--official-test', action='store_true',
                      help='also convert the official testing/ patients into imagesTs (official layout only)')

    la = datasets.add_parser('la', help='2018 Left Atrium challenge LGE-MRI (release or community HDF5 layout)',
                             description='LA: the community 80/20 split; labelled = the first N training scans.')
    _add_common(la, 'LA')
    la.add_argument('--spacing', type=float, nargs=3, metavar=('X', 'Y', 'Z'),
                    help='voxel spacing in mm written for HDF5 sources (default 0.625 0.625 0.625)')
    la.add_argument('--val', type=int, metavar='N',
                    help='hold out the last N unlabelled training scans as validation (default: the test scans '
                         'are the validation cases, as in the community code)')

    mmwhs = datasets.add_parser('mmwhs', help='MM-WHS whole-heart CT or MRI (ARCO split)',
                                description='MM-WHS: ARCO\'s 15/5 split; labelled = train_5_ (N=1), train_10_ '
                                            '(N=2) or the first N of train_all.')
    _add_common(mmwhs, 'MMWHS')
    mmwhs.add_argument('--modality', choices=('ct', 'mr'), default='ct', help='ct_train or mr_train (default ct)')
    mmwhs.add_argument('--val', type=int, metavar='N',
                       help='hold out the last N unlabelled training volumes as validation (default: the test '
                            'volumes)')
    mmwhs.add_argument('--map-value', action='append', metavar='RAW=VALUE',
                       help='accept a stray raw label value as a standard one, e.g. 421=420 (repeatable)')
    for parser in (acdc, la, mmwhs):
        parser.set_defaults(func=_run)
