"""Finding and checking the unlabelled images of a raw nnU-Net dataset (``imagesTrUnlabeled/``).

Every problem is reported before any preprocessing or training compute is spent, naming the file and the fix.
"""
import os
import re
import warnings
from typing import Dict, List

UNLABELED_FOLDER = 'imagesTrUnlabeled'

# Image formats (nnU-Net's readers' and other common medical/array ones). A file with one of these endings but not the
# dataset's is refused (a forgotten conversion would silently shrink the unlabelled set); any other file (notes.txt,
# Thumbs.db) and hidden files (.DS_Store, macOS "._" forks) are ignored with a warning, as nnU-Net lists only files
# with the dataset's ending.
IMAGE_ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.nhdr', '.mha', '.mhd', '.gipl', '.hdr', '.img', '.dcm', '.h5',
                 '.hdf5', '.png', '.bmp', '.tif', '.tiff', '.jpg', '.jpeg', '.npy', '.npz', '.b2nd')


class UnlabeledDataError(ValueError):
    """Bad unlabelled data: the message names the file or case and how to fix it."""


def unlabeled_raw_folder(raw_dataset_folder: str) -> str:
    return os.path.join(raw_dataset_folder, UNLABELED_FOLDER)


def num_channels(dataset_json: dict) -> int:
    names = dataset_json.get('channel_names', dataset_json.get('modality'))
    if not names:
        raise UnlabeledDataError('dataset.json has no "channel_names": cannot check unlabelled images')
    return len(names)


def labeled_identifiers(raw_dataset_folder: str, dataset_json: dict) -> List[str]:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    return list(get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json).keys())


def find_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """The unlabelled cases of a raw dataset as ``{case_id: [channel files, in channel order]}``.

    Returns an empty dict when ``imagesTrUnlabeled/`` does not exist (not an error: the trainer warns and trains
    with its supervised terms only). Raises :class:`UnlabeledDataError` for image files (:data:`IMAGE_ENDINGS`) with
    another ending than ``dataset.json``'s ``file_ending``, names not of the form ``CASE_XXXX<ending>``, a missing or
    extra channel, and case ids that are also labelled cases. Hidden files, non-image files and sub-folders are
    skipped; the files among them are named in one ``UserWarning``.
    """
    folder = unlabeled_raw_folder(raw_dataset_folder)
    if not os.path.isdir(folder):
        return {}
    ending = dataset_json['file_ending']
    n_ch = num_channels(dataset_json)
    pattern = re.compile(r'^(?P<case>.+)_(?P<ch>\d{4})' + re.escape(ending) + '$')
    cases: Dict[str, Dict[int, str]] = {}
    ignored: List[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            continue
        if name.startswith('.') or (not name.endswith(ending) and not name.lower().endswith(IMAGE_ENDINGS)):
            ignored.append(name)
            continue
        if not name.endswith(ending):
            raise UnlabeledDataError(
                f'{path}: unlabelled images must have the dataset\'s file ending "{ending}" '
                f'(dataset.json "file_ending"). Convert the file, or move it out of {UNLABELED_FOLDER}/.')
        m = pattern.match(name)
        if m is None:
            raise UnlabeledDataError(
                f'{path}: unlabelled images must be named CASE_XXXX{ending} (XXXX = 4-digit channel index, '
                f'e.g. case001_0000{ending}), like imagesTr. Rename the file.')
        ch = int(m.group('ch'))
        if ch >= n_ch:
            raise UnlabeledDataError(
                f'{path}: channel {ch:04d}, but dataset.json declares {n_ch} channel(s) '
                f'({list(dataset_json["channel_names"].values())}). Unlabelled cases need exactly the channels '
                f'of the labelled ones.')
        cases.setdefault(m.group('case'), {})[ch] = path
    if ignored:
        warnings.warn(f'{folder}: ignored {len(ignored)} file(s) that are hidden or not images: '
                      f'{", ".join(ignored[:10])}{" ..." if len(ignored) > 10 else ""}. Unlabelled images need the '
                      f'ending "{ending}".')
    for case, chans in cases.items():
        missing = [c for c in range(n_ch) if c not in chans]
        if missing:
            raise UnlabeledDataError(
                f'unlabelled case "{case}" in {folder} lacks channel(s) '
                f'{", ".join(f"{case}_{c:04d}{ending}" for c in missing)}; dataset.json declares {n_ch} channel(s). '
                f'Add the missing file(s) or remove the case.')
    clash = sorted(set(cases) & set(labeled_identifiers(raw_dataset_folder, dataset_json)))
    if clash:
        raise UnlabeledDataError(
            f'unlabelled case id(s) {clash[:5]}{" ..." if len(clash) > 5 else ""} in {folder} are also labelled '
            f'cases in imagesTr. Give unlabelled cases their own ids (rename the files in {UNLABELED_FOLDER}/).')
    return {case: [chans[c] for c in range(n_ch)] for case, chans in sorted(cases.items())}
