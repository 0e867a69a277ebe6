"""``nnunet-semiseg split -d SRC_ID -o NEW_ID --labeled N``: a label-budget copy of any nnU-Net raw dataset.

The new dataset keeps the labels of ``N`` randomly chosen groups of cases (a group = the cases of one patient,
found with ``--group-by``; by default every case is its own group); the images of the other labelled cases go
to ``imagesTrUnlabeled/`` without their labels. The source's own ``imagesTrUnlabeled/``, ``imagesTs/`` and
``labelsTs/`` are copied as they are. The source dataset is only read.
"""
import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from nnunet_semiseg.conversion.common import (ConversionInputError, InputDataError, MissingInputError,
                                              nnunet_folder, prepare_output)


def find_raw_dataset(dataset: Union[int, str]) -> Path:
    """``$nnUNet_raw/DatasetXXX_*`` for an ID (``27``, ``'27'``) or a full name (``'Dataset027_ACDC'``)."""
    raw_root = nnunet_folder('nnUNet_raw')
    if isinstance(dataset, str) and dataset.startswith('Dataset'):
        folder = raw_root / dataset
        if not folder.is_dir():
            raise MissingInputError(f'{folder} does not exist: check the dataset name and $nnUNet_raw')
        return folder
    try:
        dataset_id = int(dataset)
    except ValueError:
        raise ConversionInputError(f'{dataset!r} is neither a dataset ID nor a DatasetXXX_Name') from None
    matches = sorted(raw_root.glob(f'Dataset{dataset_id:03d}_*')) if raw_root.is_dir() else []
    if len(matches) != 1:
        found = 'none' if not matches else ', '.join(m.name for m in matches)
        raise MissingInputError(f'dataset {dataset_id} must be exactly one folder Dataset{dataset_id:03d}_* in '
                                f'{raw_root} (found {found})')
    return matches[0]


def list_training_cases(raw_folder: Path, dataset_json: dict) -> Dict[str, Tuple[List[Path], Path]]:
    """case id -> (channel image files in channel order, label file) of a raw dataset, for the imagesTr/labelsTr
    layout and for a dataset.json with an explicit ``dataset`` mapping (relative paths are relative to the
    dataset folder). Raises when a label or channel is missing."""
    ending = dataset_json['file_ending']
    num_channels = len(dataset_json['channel_names'])
    cases: Dict[str, Tuple[List[Path], Path]] = {}
    if 'dataset' in dataset_json:
        def resolve(p: str) -> Path:
            return Path(p) if Path(p).is_absolute() else raw_folder / p
        for case, entry in dataset_json['dataset'].items():
            cases[case] = ([resolve(p) for p in entry['images']], resolve(entry['label']))
    else:
        pattern = re.compile(r'(.+)_(\d{4})' + re.escape(ending))
        channels: Dict[str, Dict[int, Path]] = {}
        images_folder = raw_folder / 'imagesTr'
        if not images_folder.is_dir():
            raise MissingInputError(f'{images_folder} does not exist: the source must be an nnU-Net raw dataset')
        for path in sorted(images_folder.iterdir()):
            match = pattern.fullmatch(path.name)
            if match:
                channels.setdefault(match.group(1), {})[int(match.group(2))] = path
        for case, files in channels.items():
            if sorted(files) != list(range(num_channels)):
                raise MissingInputError(f'{images_folder}: case {case} has channels {sorted(files)}, dataset.json '
                                        f'declares {num_channels}; restore the missing files')
            cases[case] = ([files[c] for c in range(num_channels)], raw_folder / 'labelsTr' / f'{case}{ending}')
    for case, (images, label) in cases.items():
        for path in images + [label]:
            if not path.is_file():
                raise MissingInputError(f'{path} (case {case}) does not exist: restore it')
    return cases


def group_cases(case_ids: List[str], group_by: Optional[str]) -> Dict[str, List[str]]:
    """group key -> case ids. ``group_by`` is a regex matched at the start of each id; its first group (or the
    whole match) is the key, e.g. ``^(patient\\d+)`` keeps the frames of a patient together."""
    if not group_by:
        return {case: [case] for case in sorted(case_ids)}
    try:
        pattern = re.compile(group_by)
    except re.error as error:
        raise ConversionInputError(f'--group-by {group_by!r} is not a valid regular expression ({error})') from None
    groups: Dict[str, List[str]] = {}
    for case in sorted(case_ids):
        match = pattern.match(case)
        if match is None:
            raise ConversionInputError(f'case {case} does not match --group-by {group_by!r}: fix the pattern')
        groups.setdefault(match.group(1) if pattern.groups else match.group(0), []).append(case)
    return groups


def make_label_budget_split(source: Union[int, str], target_id: int, labeled: int, group_by: Optional[str] = None,
                            seed: int = 0, name: Optional[str] = None, val: int = 0,
                            overwrite: bool = False) -> Path:
    """Write ``$nnUNet_raw/Dataset<target_id>_<name>``: a copy of the source raw dataset in which only ``labeled``
    groups keep their labels (the other labelled cases become unlabelled images).

    The groups are drawn with ``numpy.random.default_rng(seed)`` from the sorted group keys, so a seed gives the
    same split on every machine. ``val`` > 0 keeps ``val`` further groups labelled as validation cases and writes
    fold 0 of ``splits_final.json`` (train = budget, val = those). ``name`` defaults to
    ``<source name>_<labeled>labeled``. Returns the new raw folder; nothing is written when a check fails."""
    import numpy as np
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    source_folder = find_raw_dataset(source)
    dataset_json_file = source_folder / 'dataset.json'
    if not dataset_json_file.is_file():
        raise MissingInputError(f'{dataset_json_file} does not exist: the source must be an nnU-Net raw dataset')
    dataset_json = load_json(str(dataset_json_file))
    source_id = int(source_folder.name[7:10])
    if target_id == source_id:
        raise ConversionInputError(f'-o {target_id} is the source dataset\'s ID: choose a new ID')
    name = name or f'{source_folder.name[11:]}_{labeled}labeled'
    raw_folder, preprocessed_folder = prepare_output(target_id, name, overwrite)
    ending = dataset_json['file_ending']

    cases = list_training_cases(source_folder, dataset_json)
    groups = group_cases(list(cases), group_by)
    if val < 0:
        raise ConversionInputError(f'--val {val} is invalid: use 0 or more')
    if not 1 <= labeled or labeled + val > len(groups):
        raise ConversionInputError(
            f'--labeled {labeled} (+ --val {val}) is impossible: the source has {len(groups)} '
            f'{"groups" if group_by else "labelled cases"}; choose 1 <= N <= {len(groups) - val}')
    keys = sorted(groups)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    labeled_cases = sorted(c for k in order[:labeled] for c in groups[k])
    validation_cases = sorted(c for k in order[labeled:labeled + val] for c in groups[k])
    unlabeled_cases = sorted(c for k in order[labeled + val:] for c in groups[k])

    carried = {}  # relative path in the new dataset -> source file
    for folder in ('imagesTrUnlabeled', 'imagesTs', 'labelsTs'):
        if (source_folder / folder).is_dir():
            for path in sorted((source_folder / folder).iterdir()):
                if path.is_file() and path.name.endswith(ending):
                    carried[f'{folder}/{path.name}'] = path
    for case in unlabeled_cases:
        for channel, image in enumerate(cases[case][0]):
            target = f'imagesTrUnlabeled/{case}_{channel:04d}{ending}'
            if target in carried:
                raise ConversionInputError(f'{carried[target]} has the name that case {case} of imagesTr gets as '
                                           f'an unlabelled image: rename one of them')
            carried[target] = image
    for case in labeled_cases + validation_cases:
        images, label = cases[case]
        for channel, image in enumerate(images):
            carried[f'imagesTr/{case}_{channel:04d}{ending}'] = image
        carried[f'labelsTr/{case}{ending}'] = label

    if raw_folder.exists():
        shutil.rmtree(raw_folder)
    try:
        for relative, source_file in carried.items():
            (raw_folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_file, raw_folder / relative)
        (raw_folder / 'imagesTr').mkdir(exist_ok=True)
        (raw_folder / 'labelsTr').mkdir(exist_ok=True)
        new_json = {k: v for k, v in dataset_json.items() if k != 'dataset'}
        new_json.update(numTraining=len(labeled_cases) + len(validation_cases), name=raw_folder.name,
                        description=f'label-budget copy of {source_folder.name}: {labeled} labelled '
                                    f'{"groups" if group_by else "cases"} (seed {seed}), '
                                    f'{len(unlabeled_cases)} cases moved to imagesTrUnlabeled',
                        converted_by='nnunet-semiseg split')
        save_json(new_json, str(raw_folder / 'dataset.json'), sort_keys=False)
    except BaseException:
        shutil.rmtree(raw_folder, ignore_errors=True)
        raise
    splits_file = preprocessed_folder / 'splits_final.json'
    if val:
        preprocessed_folder.mkdir(parents=True, exist_ok=True)
        save_json([{'train': labeled_cases, 'val': validation_cases}], str(splits_file))
    elif splits_file.is_file():  # only reachable with overwrite: a split of the old content would be wrong
        splits_file.unlink()
    print(f'{raw_folder}: {len(labeled_cases)} labelled + {len(validation_cases)} validation cases in imagesTr, '
          f'{len(unlabeled_cases)} moved to imagesTrUnlabeled '
          f'({sum(1 for k in carried if k.startswith("imagesTrUnlabeled/"))} unlabelled image files in all)')
    if not val and len(labeled_cases) < 5:
        print(f'note: nnU-Net\'s default 5-fold split needs at least 5 cases in imagesTr; with '
              f'{len(labeled_cases)}, pass --val M (fold 0 written to splits_final.json) or write the split yourself')
    return raw_folder


def _run(args: argparse.Namespace) -> int:
    try:
        make_label_budget_split(args.dataset, args.output_id, args.labeled, group_by=args.group_by, seed=args.seed,
                                name=args.name, val=args.val, overwrite=args.overwrite)
    except InputDataError as error:
        print(f'nnunet-semiseg split: error: {error}', file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    """Register ``split``."""
    parser = subparsers.add_parser(
        'split', help='label-budget copy of an nnU-Net raw dataset (rest of the labels -> imagesTrUnlabeled)',
        description='Copy $nnUNet_raw/DatasetSRC into a new dataset in which only N groups of cases keep their '
                    'labels; the other training images go to imagesTrUnlabeled. The source is not modified.')
    parser.add_argument('-d', '--dataset', required=True, help='source dataset ID or DatasetXXX_Name')
    parser.add_argument('-o', '--output-id', type=int, required=True, help='ID of the new dataset')
    parser.add_argument('--labeled', type=int, required=True,
                        help='number of groups (cases, or patients with --group-by) that keep their labels')
    parser.add_argument('--group-by', metavar='PATTERN',
                        help=r"regex whose first group names a case's patient, e.g. '^(patient\d+)' "
                             "(default: each case is its own group)")
    parser.add_argument('--seed', type=int, default=0, help='random seed of the draw (default 0)')
    parser.add_argument('--val', type=int, default=0, metavar='M',
                        help='also keep M groups labelled as validation and write fold 0 of splits_final.json')
    parser.add_argument('--name', help='name of the new dataset (default <source name>_<N>labeled)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output dataset')
    parser.set_defaults(func=_run)
