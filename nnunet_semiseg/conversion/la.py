"""2018 Left Atrium Segmentation Challenge (LGE-MRI, one label: left atrium) to nnU-Net.

Two source layouts, detected automatically:

* challenge release: ``Training Set/<ID>/lgemri.nrrd`` and ``laendo.nrrd`` (0/255, mapped to 0/1); spacing from
  the NRRD headers (0.625 mm isotropic).
* community HDF5 layout (UA-MT and followers): ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with ``image``
  (cropped around the atrium, z-scored) and ``label`` (0/1), both ``[X, Y, Z]``, next to ``train.list`` and
  ``test.list``. HDF5 stores no spacing: ``LA_H5_SPACING_XYZ`` (0.625 mm isotropic) unless ``spacing`` is given.

Split: the community's 80 / 20 scans (``lists/la_*.txt``) unless the source folder has ``train.list`` /
``test.list`` (they take precedence). Labelled = the first ``labeled`` scans of the training list; the other
training scans go to imagesTrUnlabeled; test scans to imagesTs/labelsTs. The benchmark has no validation set:
by default the test scans are also the validation cases (imagesTr/labelsTr, fold 0 ``val``), which is what the
community's code does; ``val=N`` instead holds out the last N unlabelled training scans as validation.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_semiseg.conversion.common import (ConversionInputError, DatasetPlan, MissingInputError, SourceCase,
                                              UnknownLayoutError, builtin_list, execute_plan, hold_out_last,
                                              read_h5_volume, read_itk_pair, read_list_file)

LA_LABELS = {'background': 0, 'left_atrium': 1}
LA_H5_SPACING_XYZ = (0.625, 0.625, 0.625)


def detect_la_layout(src) -> Tuple[str, Path]:
    """``('official', folder)`` for a folder of ``<ID>/lgemri.nrrd`` (``src`` or ``src/Training Set``), or
    ``('h5', folder)`` for a folder of ``<ID>/mri_norm2.h5`` (``src/2018LA_Seg_Training Set`` or ``src``)."""
    src = Path(src)
    if not src.is_dir():
        raise MissingInputError(f'{src} is not a folder: give the LA folder (with "Training Set" or '
                                f'"2018LA_Seg_Training Set")')
    for folder in (src / 'Training Set', src):
        if any(folder.glob('*/lgemri.nrrd')):
            return 'official', folder
    for folder in (src / '2018LA_Seg_Training Set', src):
        if any(folder.glob('*/mri_norm2.h5')):
            return 'h5', folder
    raise UnknownLayoutError(
        f'{src}: no LA layout found. Expected "Training Set/<ID>/lgemri.nrrd" (challenge release) or '
        f'"2018LA_Seg_Training Set/<ID>/mri_norm2.h5" with train.list/test.list (community HDF5 layout)')


def _find_list(src: Path, folder: Path, role: str) -> Optional[Path]:
    for candidate in dict.fromkeys((src, folder, folder.parent)):
        if (candidate / f'{role}.list').is_file():
            return candidate / f'{role}.list'
    return None


def plan_la(src, dataset_id: int, labeled: int, name: str = 'LA', val: Optional[int] = None,
            spacing: Optional[Sequence[float]] = None) -> DatasetPlan:
    """Decide which LA scan goes where (see the module docstring) without reading image data.

    ``val``: None = the test scans double as validation; N = the last N non-labelled training scans are the
    validation cases instead. ``spacing``: ``(x, y, z)`` mm for the HDF5 layout."""
    src = Path(src)
    layout, folder = detect_la_layout(src)
    notes = [f'LA: {layout} layout in {folder}']
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ConversionInputError(f'--spacing {spacing} is invalid: give three positive numbers X Y Z in mm')
    if layout == 'official':
        if spacing is not None:
            notes.append('  --spacing is ignored: the NRRD files carry their spacing')
        present = {d.name for d in folder.iterdir() if (d / 'lgemri.nrrd').is_file()}
    else:
        spacing_xyz = tuple(float(s) for s in spacing) if spacing is not None else LA_H5_SPACING_XYZ
        notes.append(f'  HDF5 stores no spacing: writing {spacing_xyz} mm (x, y, z)')
        present = {d.name for d in folder.iterdir() if (d / 'mri_norm2.h5').is_file()}

    def make_case(scan: str) -> SourceCase:
        if layout == 'official':
            image, label = folder / scan / 'lgemri.nrrd', folder / scan / 'laendo.nrrd'
            if not label.is_file():
                raise MissingInputError(f'{label} does not exist: restore the label of {scan}')
            return SourceCase(scan, read_itk_pair, (str(image), str(label)), {0: 0, 255: 1},
                              f'{image} / {label.name}')
        path = folder / scan / 'mri_norm2.h5'
        return SourceCase(scan, read_h5_volume, (str(path), 'xyz', spacing_xyz), {0: 0, 1: 1}, str(path))

    per_role: Dict[str, List[str]] = {}
    for role in ('train', 'test'):
        path = _find_list(src, folder, role)
        scans = read_list_file(path) if path else builtin_list(f'la_{role}')
        notes.append(f'  {role} list: {path if path else "built-in (UA-MT 80/20)"}')
        absent = [s for s in scans if s not in present]
        if absent and path is not None:
            raise MissingInputError(f'{path} names {absent[0]}, but {folder / absent[0]} has no image: restore it '
                                    f'or remove the line')
        if absent:
            notes.append(f'  {len(absent)} of the {len(scans)} built-in {role} scans are not in {folder}; using '
                         f'the {len(scans) - len(absent)} present')
        per_role[role] = [s for s in scans if s in present]
    overlap = set(per_role['train']) & set(per_role['test'])
    if overlap:
        raise ConversionInputError(f'{sorted(overlap)[0]} is in both the train and the test list: fix the lists')
    unlisted = sorted(present - set(per_role['train']) - set(per_role['test']))
    if unlisted:
        notes.append(f'  {len(unlisted)} scan(s) in no list are ignored')

    train = per_role['train']
    if not 1 <= labeled <= len(train):
        raise ConversionInputError(f'--labeled {labeled} is impossible: {len(train)} training scans were found in '
                                   f'{folder}; choose 1 <= N <= {len(train)}')
    labeled_ids = train[:labeled]
    if val is None:
        if not per_role['test']:
            raise ConversionInputError(
                f'no validation cases: by default the test scans are the validation cases, and {folder} has none; '
                f'pass --val N to hold out the last N training scans')
        validation_ids = per_role['test']
        notes.append('  validation = the test scans (the community protocol); --val N holds out training scans '
                     'instead')
    else:
        validation_ids = hold_out_last(train, labeled_ids, val)
    unlabeled_ids = [s for s in train if s not in labeled_ids and s not in validation_ids]
    return DatasetPlan(
        dataset_id=dataset_id, name=name, channel_names={0: 'MRI'}, labels=dict(LA_LABELS),
        labeled=[make_case(s) for s in labeled_ids], unlabeled=[make_case(s) for s in unlabeled_ids],
        validation=[make_case(s) for s in validation_ids], test=[make_case(s) for s in per_role['test']],
        description=f'2018 Left Atrium Segmentation Challenge LGE-MRI, {labeled} labelled training scans, the '
                    f'others unlabelled in imagesTrUnlabeled; converted from the {layout} layout',
        reference='Xiong et al., Medical Image Analysis 67, 2021 (2018 Atrial Segmentation Challenge)',
        licence='see http://atriaseg2018.cardiacatlas.org/', notes=notes)


def convert_la(src, dataset_id: int, labeled: int, name: str = 'LA', val: Optional[int] = None,
               spacing: Optional[Sequence[float]] = None, overwrite: bool = False, num_processes: int = 1) -> Path:
    """Convert the LA data at ``src`` into ``$nnUNet_raw/DatasetXXX_<name>`` with ``labeled`` labelled scans and
    write fold 0 of ``splits_final.json``. Returns the raw folder; bad input raises before anything is written."""
    plan = plan_la(src, dataset_id, labeled, name=name, val=val, spacing=spacing)
    return execute_plan(plan, overwrite=overwrite, num_processes=num_processes)
