"""Machinery shared by the converters and the ``split`` command: the errors the CLI prints as one line, nnU-Net's
folders read at call time, case readers (NIfTI/NRRD through SimpleITK, the community's HDF5 files through h5py),
and the validate-everything-then-write pipeline that turns a :class:`DatasetPlan` into an nnU-Net raw dataset.

Geometry conventions: SimpleITK images carry spacing in world order ``(x, y, z)`` mm; numpy arrays taken from
them are ``[z, y, x]``. HDF5 arrays carry no spacing, so their readers take ``spacing_xyz`` and the axis order
the file stores (``'zyx'`` for the ACDC files, ``'xyz'`` for the LA files).
"""
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_semiseg.image_checks import nonfinite_problem

FILE_ENDING = '.nii.gz'


class InputDataError(Exception):
    """An error caused by the user's data or arguments. The CLI prints it as one line (no traceback)."""


class ConversionInputError(InputDataError, ValueError):
    """Bad input: wrong values, mismatching geometry, impossible label budget, an output that already exists."""


class MissingInputError(InputDataError, FileNotFoundError):
    """A file or folder the conversion needs does not exist."""


class UnknownLayoutError(ConversionInputError):
    """The source folder matches none of the layouts a converter knows."""


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net folders and names

def nnunet_folder(env_var: str) -> Path:
    """``$nnUNet_raw`` / ``$nnUNet_preprocessed`` / ``$nnUNet_results``, read now (not at import time)."""
    value = os.environ.get(env_var)
    if not value:
        raise ConversionInputError(
            f'{env_var} is not set: export {env_var}=/path/to/{env_var} '
            f'(see nnU-Net\'s documentation/setting_up_paths.md)')
    return Path(value)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset027_ACDC`` style name, after checking the ID and the name."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConversionInputError(f'dataset ID {dataset_id!r} is invalid: use an integer from 1 to 999')
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_\-]*', name or ''):
        raise ConversionInputError(f'dataset name {name!r} is invalid: use letters, digits, "_" or "-"')
    return f'Dataset{dataset_id:03d}_{name}'


def prepare_output(dataset_id: int, name: str, overwrite: bool) -> Tuple[Path, Path]:
    """Check that ``DatasetXXX_name`` can be written and return ``(raw_folder, preprocessed_folder)``.

    Refuses a dataset ID already used under another name (nnU-Net could no longer resolve the ID) and, without
    ``overwrite``, an existing raw folder or an existing ``splits_final.json``. Writes nothing."""
    folder = dataset_folder_name(dataset_id, name)
    raw_root, preprocessed_root = nnunet_folder('nnUNet_raw'), nnunet_folder('nnUNet_preprocessed')
    roots = [raw_root, preprocessed_root]
    if os.environ.get('nnUNet_results'):
        roots.append(Path(os.environ['nnUNet_results']))
    prefix = f'Dataset{dataset_id:03d}_'
    for root in roots:
        if not root.is_dir():
            continue
        for other in root.iterdir():
            if other.is_dir() and other.name.startswith(prefix) and other.name != folder:
                raise ConversionInputError(
                    f'dataset ID {dataset_id} is already used by {other}: choose another ID (-d) or remove that '
                    f'folder')
    raw_folder, preprocessed_folder = raw_root / folder, preprocessed_root / folder
    if not overwrite:
        for existing in (raw_folder, preprocessed_folder / 'splits_final.json'):
            if existing.exists():
                raise ConversionInputError(f'{existing} already exists: pass --overwrite to replace it')
    return raw_folder, preprocessed_folder


# ----------------------------------------------------------------------------------------------------------------
# case lists

def read_list_file(path) -> List[str]:
    """Case names of a ``*.list`` / ``*.txt`` file, in file order, duplicates removed.

    Accepts the forms the community's files use: ``patient099_frame01``, ``data/patient099_frame01.h5``,
    blank lines and ``#`` comments."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        name = line.replace('\\', '/').rsplit('/', 1)[-1]
        for suffix in ('.h5', '.nii.gz', '.nii', '.nrrd'):
            if name.endswith(suffix):
                name = name[:-len(suffix)]
        names.append(name)
    return list(dict.fromkeys(names))


def builtin_list(name: str) -> List[str]:
    """A split list shipped with the package (``nnunet_semiseg/conversion/lists/<name>.txt``, see its README)."""
    with resources.as_file(resources.files('nnunet_semiseg.conversion') / 'lists' / f'{name}.txt') as path:
        return read_list_file(path)


def hold_out_last(train_ids: Sequence[str], labeled_ids: Sequence[str], count: int) -> List[str]:
    """The last ``count`` cases of a training list that are not labelled, in list order: a validation set for
    datasets whose benchmark has none (``--val N``)."""
    labeled = set(labeled_ids)
    candidates = [c for c in train_ids if c not in labeled]
    if not 1 <= count <= len(candidates):
        raise ConversionInputError(
            f'--val {count} is impossible: {len(candidates)} training cases are left after the labelled budget; '
            f'choose 1 <= N <= {len(candidates)}')
    return candidates[-count:]


# ----------------------------------------------------------------------------------------------------------------
# readers (module-level functions so that worker processes can receive them)

def _read_itk(path):
    import SimpleITK as sitk
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f'{path} does not exist: restore the file or remove the case')
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else 'unreadable'
        raise ConversionInputError(f'{path} cannot be read ({first_line}): replace the file') from None


def read_itk_pair(image_path, label_path, with_label: bool = True):
    """Image and label files SimpleITK can read (NIfTI, NRRD, ...). Returns ``(image, label or None)``."""
    image = _read_itk(image_path)
    label = _read_itk(label_path) if with_label else None
    return image, label


def array_to_itk(array: np.ndarray, axis_order: str, spacing_xyz: Sequence[float]):
    """A 3-D array stored as ``[z, y, x]`` (``axis_order='zyx'``) or ``[x, y, z]`` (``'xyz'``) as a SimpleITK
    image with spacing ``spacing_xyz`` (mm, world order), origin 0 and identity direction."""
    import SimpleITK as sitk
    if axis_order == 'xyz':
        array = array.transpose(2, 1, 0)
    elif axis_order != 'zyx':
        raise ValueError(f'axis_order must be "zyx" or "xyz", got {axis_order!r}')
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing_xyz])
    return image


def _h5_arrays(path, keys: Sequence[str]) -> List[np.ndarray]:
    import h5py
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f'{path} does not exist: restore the file or remove the case')
    try:
        with h5py.File(path, 'r') as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise MissingInputError(f'{path} has no dataset {missing[0]!r} (it has {sorted(f.keys())}): '
                                        f'the file must hold "image" and "label"')
            return [f[k][()] for k in keys]
    except OSError as error:
        raise ConversionInputError(f'{path} cannot be read as HDF5 ({error}): replace the file') from None


def read_h5_volume(path, axis_order: str, spacing_xyz: Sequence[float], with_label: bool = True):
    """A community HDF5 volume with datasets ``image`` and ``label`` of the same 3-D shape, stored in
    ``axis_order``. Returns ``(image, label or None)`` SimpleITK images with spacing ``spacing_xyz``."""
    arrays = _h5_arrays(path, ['image', 'label'] if with_label else ['image'])
    for key, array in zip(('image', 'label'), arrays):
        if array.ndim != 3:
            raise ConversionInputError(f'{path}: dataset {key!r} has shape {array.shape}, expected a 3-D volume')
    images = [array_to_itk(a, axis_order, spacing_xyz) for a in arrays]
    return images[0], (images[1] if with_label else None)


def read_h5_slices(paths: Sequence, spacing_xyz: Sequence[float], with_label: bool = True):
    """2-D HDF5 slices (``image``/``label`` of shape ``[H, W]``, given in slice order) stacked into ``[Z, H, W]``
    volumes. Returns ``(image, label or None)`` SimpleITK images with spacing ``spacing_xyz``."""
    keys = ['image', 'label'] if with_label else ['image']
    per_slice = [_h5_arrays(p, keys) for p in paths]
    for p, arrays in zip(paths, per_slice):
        if any(a.shape != per_slice[0][0].shape or a.ndim != 2 for a in arrays):
            raise ConversionInputError(
                f'{p}: slice shape {[a.shape for a in arrays]} differs from {per_slice[0][0].shape} of the first '
                f'slice; all slices of a frame must be 2-D and equal in size')
    volumes = [np.stack([arrays[i] for arrays in per_slice]) for i in range(len(keys))]
    images = [array_to_itk(v, 'zyx', spacing_xyz) for v in volumes]
    return images[0], (images[1] if with_label else None)


# ----------------------------------------------------------------------------------------------------------------
# what to convert

@dataclass(frozen=True)
class SourceCase:
    """One case of a source dataset.

    ``reader(*args, with_label=...)`` returns ``(image, label or None)`` as SimpleITK images; ``label_map`` maps
    every value the source label may hold to nnU-Net's consecutive label (other values are an error);
    ``source`` names the file(s) in messages; ``has_label`` is False for test cases without reference."""
    case_id: str
    reader: Callable
    args: tuple
    label_map: Mapping[int, int]
    source: str
    has_label: bool = True

    def load(self, with_label: bool):
        return self.reader(*self.args, with_label=with_label)


@dataclass
class DatasetPlan:
    """Everything a converter decided before touching the data: which case goes where.

    ``labeled`` (the label budget) and ``validation`` go to imagesTr/labelsTr and form fold 0 of
    splits_final.json; ``unlabeled`` go to imagesTrUnlabeled (images only); ``test`` go to imagesTs (and
    labelsTs where labelled). A case may be both validation and test (LA/MMWHS default)."""
    dataset_id: int
    name: str
    channel_names: Dict[int, str]
    labels: Dict[str, int]
    labeled: List[SourceCase]
    unlabeled: List[SourceCase]
    validation: List[SourceCase]
    test: List[SourceCase]
    description: str = ''
    reference: str = ''
    licence: str = ''
    notes: List[str] = field(default_factory=list)


def _image_folders(plan: DatasetPlan) -> Dict[str, Tuple[SourceCase, List[str], List[str]]]:
    """case_id -> (case, image folders, label folders), checking that the roles do not collide."""
    routes: Dict[str, Tuple[SourceCase, List[str], List[str]]] = {}
    seen_training: Dict[str, str] = {}
    for role, cases in (('labelled', plan.labeled), ('unlabelled', plan.unlabeled),
                        ('validation', plan.validation)):
        for case in cases:
            if case.case_id in seen_training:
                raise ConversionInputError(
                    f'case {case.case_id} is both {seen_training[case.case_id]} and {role}: fix the split lists')
            seen_training[case.case_id] = role
    for case in plan.labeled + plan.validation:
        routes[case.case_id] = (case, ['imagesTr'], ['labelsTr'])
    for case in plan.unlabeled:
        routes[case.case_id] = (case, ['imagesTrUnlabeled'], [])
    for case in plan.test:
        if case.case_id in routes and routes[case.case_id][0].source != case.source:
            raise ConversionInputError(f'case id {case.case_id} names two different sources: '
                                       f'{routes[case.case_id][0].source} and {case.source}')
        previous = routes.get(case.case_id, (case, [], []))
        routes[case.case_id] = (case, previous[1] + ['imagesTs'],
                                previous[2] + (['labelsTs'] if case.has_label else []))
    return routes


def check_case(case: SourceCase, with_label: bool) -> Optional[str]:
    """Load one case and return what is wrong with it (None when it can be converted): unreadable files,
    NaN/inf intensities, vector images, label values outside ``case.label_map``, image/label shape or spacing
    that disagree."""
    import SimpleITK as sitk
    try:
        image, label = case.load(with_label)
    except InputDataError as error:
        return str(error)
    if image.GetNumberOfComponentsPerPixel() != 1:
        return f'{case.source}: the image has {image.GetNumberOfComponentsPerPixel()} components per voxel, ' \
               f'expected a scalar image'
    if image.GetDimension() != 3:
        return f'{case.source}: the image is {image.GetDimension()}-D, expected 3-D'
    problem = nonfinite_problem(sitk.GetArrayViewFromImage(image), case.source)
    if problem:
        return problem
    if not with_label:
        return None
    if image.GetSize() != label.GetSize():
        return f'{case.source}: image size {image.GetSize()} and label size {label.GetSize()} (x, y, z) differ; ' \
               f'the label must be drawn on the image grid'
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=1e-3, atol=1e-5):
        return f'{case.source}: image spacing {tuple(round(s, 5) for s in image.GetSpacing())} and label spacing ' \
               f'{tuple(round(s, 5) for s in label.GetSpacing())} (x, y, z mm) differ; fix the file header'
    values = np.unique(sitk.GetArrayViewFromImage(label))
    unexpected = [v for v in values.tolist() if v not in case.label_map]
    if unexpected:
        shown = [int(v) if float(v).is_integer() else v for v in unexpected[:10]]
        return f'{case.source}: unexpected label values {shown} (expected {sorted(case.label_map)}); fix the label ' \
               f'file or remove the case'
    return None


def map_label(label, label_map: Mapping[int, int]):
    """The label image with source values replaced by nnU-Net's labels, as uint8 (geometry unchanged)."""
    import SimpleITK as sitk
    source = sitk.GetArrayViewFromImage(label)
    mapped = np.zeros(source.shape, dtype=np.uint8)
    for value, target in label_map.items():
        if target:
            mapped[source == value] = target
    result = sitk.GetImageFromArray(mapped)
    result.CopyInformation(label)
    return result


def write_case(case: SourceCase, output_folder: str, image_folders: Sequence[str],
               label_folders: Sequence[str]) -> None:
    """Write ``<case_id>_0000.nii.gz`` into each image folder and ``<case_id>.nii.gz`` into each label folder.
    The label gets the image's geometry (origin, direction), since it was drawn on the image grid."""
    import SimpleITK as sitk
    image, label = case.load(with_label=bool(label_folders))
    for folder in image_folders:
        sitk.WriteImage(image, os.path.join(output_folder, folder, f'{case.case_id}_0000{FILE_ENDING}'),
                        useCompression=True)
    if label_folders:
        mapped = map_label(label, case.label_map)
        mapped.CopyInformation(image)
        for folder in label_folders:
            sitk.WriteImage(mapped, os.path.join(output_folder, folder, f'{case.case_id}{FILE_ENDING}'),
                            useCompression=True)


def _call(job):
    function, args = job
    return function(*args)


def run_jobs(function: Callable, jobs: Sequence[tuple], num_processes: int, desc: str) -> list:
    """``[function(*job) for job in jobs]`` with a tqdm bar, in ``num_processes`` spawned workers when > 1
    (spawn as nnU-Net does: the caller may hold torch/OpenMP threads, which do not survive fork)."""
    from tqdm import tqdm
    if num_processes <= 1 or len(jobs) <= 1:
        return [function(*job) for job in tqdm(jobs, desc=desc, unit='case')]
    import multiprocessing
    with multiprocessing.get_context('spawn').Pool(min(num_processes, len(jobs))) as pool:
        return list(tqdm(pool.imap(_call, [(function, job) for job in jobs]), total=len(jobs), desc=desc,
                         unit='case'))


def execute_plan(plan: DatasetPlan, overwrite: bool = False, num_processes: int = 1) -> Path:
    """Validate every case of ``plan``, then write the nnU-Net raw dataset and fold 0 of splits_final.json.

    Nothing is written unless every case passed; a failure while writing removes the partial dataset folder.
    Returns the raw dataset folder."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    raw_folder, preprocessed_folder = prepare_output(plan.dataset_id, plan.name, overwrite)
    if not plan.labeled:
        raise ConversionInputError('the label budget is empty: --labeled must be at least 1')
    if not plan.validation:
        raise ConversionInputError('no validation case: fold 0 of splits_final.json needs at least one')
    routes = _image_folders(plan)
    for note in plan.notes:
        print(note)

    errors = run_jobs(check_case, [(case, bool(labels)) for case, _, labels in routes.values()], num_processes,
                      'checking')
    errors = [e for e in errors if e]
    if errors:
        more = f' (and {len(errors) - 1} more problem(s) of the same kind)' if len(errors) > 1 else ''
        raise ConversionInputError(errors[0] + more)

    if raw_folder.exists():
        shutil.rmtree(raw_folder)
    try:
        for folder in sorted({f for _, images, labels in routes.values() for f in images + labels}):
            (raw_folder / folder).mkdir(parents=True, exist_ok=True)
        run_jobs(write_case, [(case, str(raw_folder), images, labels) for case, images, labels in routes.values()],
                 num_processes, 'writing')
        generate_dataset_json(
            str(raw_folder), channel_names=dict(plan.channel_names), labels=dict(plan.labels),
            num_training_cases=len(plan.labeled) + len(plan.validation), file_ending=FILE_ENDING,
            dataset_name=raw_folder.name, reference=plan.reference or None, description=plan.description or None,
            license=plan.licence or 'see the reference', converted_by='nnunet-semiseg convert')
    except BaseException:
        shutil.rmtree(raw_folder, ignore_errors=True)
        raise

    stale = [p.name for p in preprocessed_folder.glob('*')] if preprocessed_folder.is_dir() else []
    preprocessed_folder.mkdir(parents=True, exist_ok=True)
    split = [{'train': sorted(c.case_id for c in plan.labeled), 'val': sorted(c.case_id for c in plan.validation)}]
    save_json(split, str(preprocessed_folder / 'splits_final.json'))
    if any(name != 'splits_final.json' for name in stale):
        print(f'note: {preprocessed_folder} already held {sorted(stale)}: run nnUNetv2_plan_and_preprocess with '
              f'--clean so that nnU-Net does not reuse a fingerprint of the old data')
    print(f'{raw_folder}: {len(plan.labeled)} labelled + {len(plan.validation)} validation cases in imagesTr, '
          f'{len(plan.unlabeled)} in imagesTrUnlabeled, {len(plan.test)} in imagesTs; '
          f'fold 0 of {preprocessed_folder / "splits_final.json"} trains on the labelled cases')
    return raw_folder
