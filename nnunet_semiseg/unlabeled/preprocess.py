"""Preprocessing of unlabelled images with the dataset's own plans (design §3).

``nnUNet_raw/DatasetXXX/imagesTrUnlabeled/`` is preprocessed exactly as nnU-Net preprocesses a labelled case
(the configuration's own preprocessor class: transpose, crop, normalise with the *labelled* fingerprint,
resample) into the sibling folder ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/``. A sibling,
not a sub-folder, because nnU-Net lists every case in ``<data_identifier>/`` for its splits and ``rmtree``s it
when preprocessing again.

Every case is checked as it is read, with the plans' own reader: non-finite intensities and a dimensionality other
than the labelled images' (a 2-D slice among 3-D volumes) are refused, naming the file and the fix
(:mod:`nnunet_semiseg.image_checks`, the converters' check too).

A manifest (``semiseg_manifest.json``) records a hash of everything in the plans that changes preprocessed
voxels and the size/mtime of every source file: cases are redone when the plans change, added when new images
appear and removed when images disappear, so a stale folder is never reused. A file lock makes concurrent
trainings (several folds at once) take turns.
"""
import hashlib
import json
import multiprocessing
import os
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

from nnunet_semiseg.image_checks import nonfinite_problem, spatial_dims

from .discovery import UnlabeledDataError, find_unlabeled_cases

MANIFEST = 'semiseg_manifest.json'
SUFFIX = '_unlabeled'


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder, data_identifier + SUFFIX)


def preprocessing_fingerprint(plans_manager, configuration_manager, dataset_json: dict) -> str:
    """sha256 over what determines the preprocessed voxels (not the architecture, batch or patch size, so
    derived plans that share a ``data_identifier`` reuse the folder, as they reuse nnU-Net's own)."""
    cfg = configuration_manager.configuration
    keys = ('data_identifier', 'preprocessor_name', 'spacing', 'normalization_schemes', 'use_mask_for_norm',
            'resampling_fn_data', 'resampling_fn_data_kwargs', 'resampling_fn_seg', 'resampling_fn_seg_kwargs')
    plans = plans_manager.plans
    relevant = {
        'configuration': {k: cfg.get(k) for k in keys},
        'transpose_forward': plans.get('transpose_forward'),
        'intensity': plans.get('foreground_intensity_properties_per_channel'),
        'reader_writer': plans.get('image_reader_writer'),
        'channel_names': dataset_json.get('channel_names'),
        'file_ending': dataset_json.get('file_ending'),
        'format': 2,  # 2: cases are checked for non-finite values and dimensionality (older folders are redone)
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _file_stamp(files: List[str]) -> List[list]:
    return [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


@contextmanager
def _folder_lock(path: str):
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; rank 0 + barrier still apply
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _first_line(error: Exception) -> str:
    # readers (SimpleITK) raise multi-line messages; the CLI prints one line
    lines = str(error).strip().splitlines()
    return lines[0] if lines else 'no message'


def labeled_spatial_dims(raw_dataset_folder: str, plans_manager, dataset_json: dict) -> Optional[int]:
    """2 or 3, the spatial dimensionality of the first labelled case as the plans' reader sees it (``None`` if
    there is no readable labelled case: nnU-Net's own checks report that)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    labeled = get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json)
    if not labeled:
        return None
    first = labeled[sorted(labeled)[0]]['images']
    try:
        image, properties = plans_manager.image_reader_writer_class().read_images(first)
    except Exception:
        return None
    return spatial_dims(image.shape, properties['spacing'])


def _preprocess_case(case: str, files: List[str], out_truncated: str, plans_manager, configuration_manager,
                     dataset_json: dict, expected_dims: Optional[int] = None) -> Tuple[int, ...]:
    """One unlabelled case: read with the plans' reader, check (finite intensities; ``expected_dims`` spatial
    dimensions unless None), preprocess as nnU-Net does a labelled one, save as blosc2. Returns its shape."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params
    source = ', '.join(files)
    try:
        image, properties = plans_manager.image_reader_writer_class().read_images(files)
    except Exception as e:  # unreadable file, channels that disagree in shape, ...
        raise UnlabeledDataError(
            f'unlabelled case "{case}" ({source}) could not be read: {type(e).__name__}: {_first_line(e)}. Fix or '
            f'remove the file(s) in imagesTrUnlabeled/.') from e
    problem = nonfinite_problem(image, f'unlabelled case "{case}" ({source})')
    if problem:
        raise UnlabeledDataError(problem + ' in imagesTrUnlabeled/')
    dims = spatial_dims(image.shape, properties['spacing'])
    if expected_dims is not None and dims != expected_dims:
        raise UnlabeledDataError(
            f'unlabelled case "{case}" ({source}) is a {dims}-D image (shape {tuple(image.shape[1:])}), but the '
            f'labelled images in imagesTr are {expected_dims}-D. Replace it with a {expected_dims}-D image or remove '
            f'it from imagesTrUnlabeled/.')
    try:
        # nnU-Net's run_case is exactly read_images + run_case_npy; the image is read once, for the checks too
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        data, seg, properties = preprocessor.run_case_npy(image, None, properties, plans_manager,
                                                          configuration_manager, dataset_json)
    except Exception as e:
        raise UnlabeledDataError(
            f'unlabelled case "{case}" ({source}) could not be preprocessed: {type(e).__name__}: {_first_line(e)}. '
            f'Fix or remove the file(s) in imagesTrUnlabeled/.') from e
    # with no label file the cropping step returns the nonzero mask (0 inside, -1 outside) as "seg"
    properties['class_locations'] = {}
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, out_truncated, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return tuple(data.shape)


def _remove_case_files(folder: str, case: str) -> None:
    for ext in ('.b2nd', '_seg.b2nd', '.pkl'):
        p = os.path.join(folder, case + ext)
        if os.path.isfile(p):
            os.remove(p)


def ensure_unlabeled_preprocessed(raw_dataset_folder: str, preprocessed_dataset_folder: str, plans_manager,
                                  configuration_manager, dataset_json: dict, num_processes: int = 1,
                                  log: Callable[[str], None] = print, progress: bool = True) -> Tuple[str, int]:
    """Bring ``<data_identifier>_unlabeled/`` up to date with ``imagesTrUnlabeled/`` and the plans.

    Returns ``(folder, number_of_unlabelled_cases)``; ``number == 0`` when the dataset has no unlabelled images.
    Raises :class:`UnlabeledDataError` (naming the case and the fix) for bad input: file names and channels before
    any case is preprocessed, contents (unreadable, non-finite, another dimensionality than the labelled images) as
    each case is read. The manifest is written only when every case passed, so a refused case is never reused.
    """
    cases = find_unlabeled_cases(raw_dataset_folder, dataset_json)  # validates everything first
    folder = unlabeled_preprocessed_folder(preprocessed_dataset_folder, configuration_manager.data_identifier)
    if not cases:
        return folder, 0
    fingerprint = preprocessing_fingerprint(plans_manager, configuration_manager, dataset_json)
    with _folder_lock(folder + '.lock'):
        manifest_file = os.path.join(folder, MANIFEST)
        manifest = {}
        if os.path.isfile(manifest_file):
            with open(manifest_file) as fh:
                manifest = json.load(fh)
        done: Dict[str, list] = manifest.get('cases', {}) if manifest.get('fingerprint') == fingerprint else {}
        if manifest and manifest.get('fingerprint') != fingerprint:
            log(f'nnunet-semiseg: plans changed since {folder} was written: preprocessing all unlabelled cases again')
        os.makedirs(folder, exist_ok=True)
        stamps = {c: _file_stamp(f) for c, f in cases.items()}
        todo = [c for c in cases if done.get(c) != stamps[c]]
        # drop cases that vanished or will be redone, and leftovers of an interrupted run
        present = {n[:-len('.pkl')] for n in os.listdir(folder) if n.endswith('.pkl')}
        for case in (present - set(cases)) | set(todo):
            _remove_case_files(folder, case)
        kept = {c: done[c] for c in cases if c not in todo}
        if todo:
            log(f'nnunet-semiseg: preprocessing {len(todo)} unlabelled case(s) of {len(cases)} into {folder}')
            expected_dims = labeled_spatial_dims(raw_dataset_folder, plans_manager, dataset_json)
            _run_cases(todo, cases, folder, plans_manager, configuration_manager, dataset_json, num_processes,
                       progress, expected_dims)
        kept.update({c: stamps[c] for c in todo})
        tmp = manifest_file + '.tmp'
        with open(tmp, 'w') as fh:
            json.dump({'fingerprint': fingerprint, 'configuration': configuration_manager.data_identifier,
                       'cases': kept}, fh, indent=1)
        os.replace(tmp, manifest_file)
    return folder, len(cases)


def _run_cases(todo, cases, folder, plans_manager, configuration_manager, dataset_json, num_processes, progress,
               expected_dims=None):
    from tqdm import tqdm
    args = [(c, cases[c], os.path.join(folder, c), plans_manager, configuration_manager, dataset_json, expected_dims)
            for c in todo]
    bar = tqdm(total=len(todo), desc='Preprocessing unlabelled cases', disable=not progress)
    if num_processes <= 1 or len(todo) == 1:
        for a in args:
            _preprocess_case(*a)
            bar.update()
    else:
        # spawn, as nnU-Net's own preprocessing does (fork after torch/threads is unsafe)
        with multiprocessing.get_context('spawn').Pool(min(num_processes, len(todo))) as pool:
            for _ in pool.imap_unordered(_star_preprocess_case, args):
                bar.update()
    bar.close()


def _star_preprocess_case(a):
    return _preprocess_case(*a)


def preprocess_unlabeled(dataset_name_or_id, configurations=('2d', '3d_fullres'), plans_identifier='nnUNetPlans',
                         num_processes: int = 1, progress: bool = True) -> Dict[str, Tuple[str, int]]:
    """Preprocess the unlabelled images of a planned dataset for each configuration (``nnunet-semiseg
    preprocess-unlabeled``). Configurations missing from the plans are skipped with a message."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(dataset_name_or_id)
    pre = os.path.join(str(nnUNet_preprocessed), name)
    plans_file = os.path.join(pre, plans_identifier + '.json')
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f'{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} '
                                f'first (unlabelled images are preprocessed with the dataset\'s own plans).')
    plans_manager = PlansManager(plans_file)
    dataset_json = load_json(os.path.join(pre, 'dataset.json'))
    raw = os.path.join(str(nnUNet_raw), name)
    out = {}
    for c in configurations:
        if c not in plans_manager.available_configurations:
            print(f'configuration {c} is not in {plans_file} (available: {plans_manager.available_configurations}); '
                  f'skipped')
            continue
        out[c] = ensure_unlabeled_preprocessed(raw, pre, plans_manager, plans_manager.get_configuration(c),
                                               dataset_json, num_processes=num_processes, progress=progress)
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'preprocess-unlabeled',
        help='preprocess imagesTrUnlabeled/ with the dataset\'s plans (otherwise done when training starts)')
    p.add_argument('-d', '--dataset', required=True, help='dataset name or id')
    p.add_argument('-c', '--configurations', nargs='+', default=['2d', '3d_fullres'])
    p.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier (default nnUNetPlans)')
    p.add_argument('-np', '--num_processes', type=int, default=4)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        out = preprocess_unlabeled(args.dataset, args.configurations, args.plans, args.num_processes)
    except (UnlabeledDataError, FileNotFoundError) as e:
        print(f'error: {e}')
        return 1
    for c, (folder, n) in out.items():
        print(f'{c}: {n} unlabelled case(s) in {folder}' if n else f'{c}: no imagesTrUnlabeled/ in the raw dataset')
    return 0
