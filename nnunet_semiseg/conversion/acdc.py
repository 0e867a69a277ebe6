"""ACDC (Automated Cardiac Diagnosis Challenge, cine MRI; labels 1 RV, 2 myocardium, 3 LV) to nnU-Net.

Two source layouts, detected automatically:

* official release: ``training/patientNNN/{Info.cfg, patientNNN_frameMM.nii.gz, patientNNN_frameMM_gt.nii.gz}``
  (``_4d`` files ignored), optionally ``testing/`` (patients 101-150). The ED and ES frames named in
  ``Info.cfg`` are converted; case ids keep the official frame numbers (``patient001_frame01``,
  ``patient001_frame12``), as nnU-Net's own ``Dataset027_ACDC`` does. Spacing comes from the NIfTI headers.
* community HDF5 layout (SSL4MIS): ``data/patientNNN_frameMM.h5`` with ``image``/``label`` ``[Z, H, W]``;
  training frames possibly only as ``data/slices/patientNNN_frameMM_slice_K.h5`` (``[H, W]``), which are
  stacked in K order; ``train.list``/``val.list``/``test.list``. There ``frame01`` is ED and ``frame02`` ES.
  HDF5 stores no spacing: ``ACDC_H5_SPACING_XYZ`` unless ``spacing`` is given.

Split: the community's 70 / 10 / 20 patients (``lists/acdc_*.txt``) unless the source folder has its own list
files (they take precedence). Labelled = the first ``labeled`` patients of the training list, all their frames;
the other training patients go to imagesTrUnlabeled; validation patients to imagesTr/labelsTr (fold 0 ``val``);
test patients to imagesTs/labelsTs.
"""
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_semiseg.conversion.common import (ConversionInputError, DatasetPlan, MissingInputError, SourceCase,
                                              UnknownLayoutError, builtin_list, execute_plan, read_h5_slices,
                                              read_h5_volume, read_itk_pair, read_list_file)

ACDC_LABELS = {'background': 0, 'RV': 1, 'MYO': 2, 'LV': 3}
ACDC_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}
# HDF5 files store no spacing. ACDC's in-plane spacing is 1.37-1.68 mm and its slice distance 5-10 mm (10 mm for
# most patients); these round values are what a network sees as the typical ACDC voxel.
ACDC_H5_SPACING_XYZ = (1.5, 1.5, 10.0)
ROLES = ('train', 'val', 'test')


def detect_acdc_layout(src) -> Tuple[str, Path]:
    """``('official', root)`` where ``root/training/patientNNN/Info.cfg`` exist, or ``('h5', root)`` where
    ``root/data`` holds ``patientNNN_frameMM.h5`` files or a ``slices`` folder. ``src`` may also be the parent
    of ``database/`` (the 2023 release) or of ``ACDC/``."""
    src = Path(src)
    if not src.is_dir():
        raise MissingInputError(f'{src} is not a folder: give the ACDC folder (with training/ or data/)')
    for root in (src, src / 'database', src / 'ACDC', src / 'ACDC' / 'database'):
        if any((root / 'training').glob('patient*/Info.cfg')):
            return 'official', root
        if any((root / 'data').glob('patient*_frame*.h5')) or any((root / 'data' / 'slices').glob('*.h5')):
            return 'h5', root
    raise UnknownLayoutError(
        f'{src}: no ACDC layout found. Expected training/patientNNN/Info.cfg (official release) or '
        f'data/patientNNN_frameMM.h5 with train.list/val.list (community HDF5 layout)')


def _patient(case_id: str) -> str:
    return case_id.split('_')[0]


def _split_lists(root: Path) -> Dict[str, Tuple[List[str], Optional[Dict[str, List[str]]], Optional[Path]]]:
    """role -> (patients in list order, frames listed per patient or None, list file or None for built-in)."""
    lists = {}
    for role in ROLES:
        path = root / f'{role}.list'
        if path.is_file():
            frames: Dict[str, List[str]] = {}
            for name in read_list_file(path):
                name = re.sub(r'_slice_\d+$', '', name)  # slice-level lists name the frame before "_slice_K"
                if not re.fullmatch(r'patient\d{3}(_frame\d{2})?', name):
                    raise ConversionInputError(f'{path}: entry {name!r} is not patientNNN or patientNNN_frameMM')
                frames.setdefault(_patient(name), [])
                if name not in frames[_patient(name)] and '_frame' in name:
                    frames[_patient(name)].append(name)
            lists[role] = (list(frames), {p: f for p, f in frames.items() if f} or None, path)
        else:
            lists[role] = (builtin_list(f'acdc_{role}'), None, None)
    seen = {}
    for role, (patients, _, path) in lists.items():
        for p in patients:
            if p in seen:
                raise ConversionInputError(f'{p} is in both the {seen[p]} and the {role} list '
                                           f'({path or "built-in"}): fix the list files')
            seen[p] = role
    return lists


def _official_cases(patient_dir: Path, need_label: bool) -> List[SourceCase]:
    """The ED and ES frames of one patient of the official release."""
    info = patient_dir / 'Info.cfg'
    if not info.is_file():
        raise MissingInputError(f'{info} does not exist: restore it (it names the ED and ES frames)')
    fields = dict(line.split(':', 1) for line in info.read_text().splitlines() if ':' in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    try:
        frames = list(dict.fromkeys([int(fields['ED']), int(fields['ES'])]))
    except (KeyError, ValueError):
        raise ConversionInputError(f'{info} does not name the ED and ES frames ("ED: 1", "ES: 12")') from None
    cases = []
    for frame in frames:
        case_id = f'{patient_dir.name}_frame{frame:02d}'
        image, label = patient_dir / f'{case_id}.nii.gz', patient_dir / f'{case_id}_gt.nii.gz'
        if not image.is_file():
            raise MissingInputError(f'{image} does not exist (frame {frame} of {info}): restore it')
        has_label = label.is_file()
        if need_label and not has_label:
            raise MissingInputError(f'{label} does not exist: restore the ground truth of {case_id}')
        cases.append(SourceCase(case_id, read_itk_pair, (str(image), str(label) if has_label else None),
                                ACDC_LABEL_MAP, f'{image}' + (f' / {label.name}' if has_label else ''), has_label))
    return cases


def _h5_cases(root: Path, spacing_xyz: Sequence[float]) -> Dict[str, SourceCase]:
    """Every frame found under ``root/data`` (volumes preferred over stacked slices)."""
    data = root / 'data'
    cases: Dict[str, SourceCase] = {}
    slices: Dict[str, List[Tuple[int, Path]]] = {}
    for path in sorted((data / 'slices').glob('patient*_frame*_slice_*.h5')):
        match = re.fullmatch(r'(patient\d{3}_frame\d{2})_slice_(\d+)', path.stem)
        if match:
            slices.setdefault(match.group(1), []).append((int(match.group(2)), path))
    for case_id, numbered in slices.items():
        numbered.sort()
        indices = [k for k, _ in numbered]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            missing = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
            raise MissingInputError(f'{data / "slices"}: slice(s) {missing} of {case_id} are missing; restore them '
                                    f'or provide the volume {data / (case_id + ".h5")}')
        paths = tuple(str(p) for _, p in numbered)
        cases[case_id] = SourceCase(case_id, read_h5_slices, (paths, tuple(spacing_xyz)), ACDC_LABEL_MAP,
                                    f'{data / "slices" / case_id}_slice_*.h5')
    for path in sorted(data.glob('patient*_frame*.h5')):
        if re.fullmatch(r'patient\d{3}_frame\d{2}', path.stem):
            cases[path.stem] = SourceCase(path.stem, read_h5_volume, (str(path), 'zyx', tuple(spacing_xyz)),
                                          ACDC_LABEL_MAP, str(path))
    return cases


def plan_acdc(src, dataset_id: int, labeled: int, name: str = 'ACDC',
              spacing: Optional[Sequence[float]] = None, official_test: bool = False) -> DatasetPlan:
    """Decide, without reading image data, which ACDC case goes where (see the module docstring).

    ``spacing``: ``(x, y, z)`` mm for the HDF5 layout (default ``ACDC_H5_SPACING_XYZ``); ``official_test``: also
    put the official ``testing/`` patients into imagesTs (off by default: the benchmark's test set is the 20
    community test patients)."""
    layout, root = detect_acdc_layout(src)
    notes = [f'ACDC: {layout} layout in {root}']
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ConversionInputError(f'--spacing {spacing} is invalid: give three positive numbers X Y Z in mm')
    lists = _split_lists(root)
    for role, (_, _, path) in lists.items():
        notes.append(f'  {role} list: {path if path else "built-in (SSL4MIS 70/10/20)"}')

    if layout == 'official':
        if spacing is not None:
            notes.append('  --spacing is ignored: the official NIfTI files carry their spacing')
        patient_dirs = {d.name: d for d in (root / 'training').iterdir()
                        if d.is_dir() and re.fullmatch(r'patient\d{3}', d.name)}

        def cases_of(patient: str, role: str, listed_frames) -> List[SourceCase]:
            return _official_cases(patient_dirs[patient], need_label=True)

        present = set(patient_dirs)
    else:
        spacing_xyz = tuple(float(s) for s in spacing) if spacing is not None else ACDC_H5_SPACING_XYZ
        notes.append(f'  HDF5 stores no spacing: writing {spacing_xyz} mm (x, y, z)')
        h5_cases = _h5_cases(root, spacing_xyz)
        present = {_patient(c) for c in h5_cases}

        def cases_of(patient: str, role: str, listed_frames) -> List[SourceCase]:
            frames = (listed_frames or {}).get(patient) or sorted(c for c in h5_cases if _patient(c) == patient)
            missing = [f for f in frames if f not in h5_cases]
            if missing:
                raise MissingInputError(
                    f'{lists[role][2]} names {missing[0]}, but neither {root / "data" / (missing[0] + ".h5")} nor '
                    f'its slices exist: restore the file or remove the line')
            return [h5_cases[f] for f in frames]

    per_role: Dict[str, List[str]] = {}
    for role, (patients, _, path) in lists.items():
        absent = [p for p in patients if p not in present]
        if absent and path is not None and layout == 'h5':
            raise MissingInputError(f'{path} names {absent[0]}, which has no file under {root / "data"}: restore '
                                    f'it or remove the line')
        if absent and path is not None:
            raise MissingInputError(f'{path} names {absent[0]}, but {root / "training" / absent[0]} does not '
                                    f'exist: restore it or remove the line')
        if absent:
            notes.append(f'  {len(absent)} of the {len(patients)} built-in {role} patients are not in {root}; '
                         f'using the {len(patients) - len(absent)} present')
        per_role[role] = [p for p in patients if p in present]
    unlisted = sorted(present - {p for ps in per_role.values() for p in ps})
    if unlisted:
        notes.append(f'  {len(unlisted)} patient(s) in no list are ignored: {", ".join(unlisted[:5])}'
                     + (' ...' if len(unlisted) > 5 else ''))

    train = per_role['train']
    if not 1 <= labeled <= len(train):
        raise ConversionInputError(f'--labeled {labeled} is impossible: {len(train)} training patients were found '
                                   f'in {root}; choose 1 <= N <= {len(train)}')

    def collect(patients: List[str], role: str) -> List[SourceCase]:
        return [case for p in patients for case in cases_of(p, role, lists[role][1])]

    test = collect(per_role['test'], 'test')
    if official_test:
        if layout != 'official' or not (root / 'testing').is_dir():
            raise MissingInputError(f'--official-test needs {root / "testing"} (official release)')
        for d in sorted((root / 'testing').iterdir()):
            if d.is_dir() and re.fullmatch(r'patient\d{3}', d.name):
                test += _official_cases(d, need_label=False)
    elif layout == 'official' and (root / 'testing').is_dir():
        notes.append(f'  {root / "testing"} is not converted (pass --official-test to add it to imagesTs)')

    return DatasetPlan(
        dataset_id=dataset_id, name=name, channel_names={0: 'cineMRI'}, labels=dict(ACDC_LABELS),
        labeled=collect(train[:labeled], 'train'), unlabeled=collect(train[labeled:], 'train'),
        validation=collect(per_role['val'], 'val'), test=test,
        description=f'ACDC cine MRI, {labeled} labelled training patients (both frames), the other training '
                    f'patients unlabelled in imagesTrUnlabeled; converted from the {layout} layout',
        reference='Bernard et al., IEEE TMI 37(11), 2018; https://www.creatis.insa-lyon.fr/Challenge/acdc/',
        licence='see https://www.creatis.insa-lyon.fr/Challenge/acdc/', notes=notes)


def convert_acdc(src, dataset_id: int, labeled: int, name: str = 'ACDC',
                 spacing: Optional[Sequence[float]] = None, official_test: bool = False, overwrite: bool = False,
                 num_processes: int = 1) -> Path:
    """Convert ACDC at ``src`` (official or community HDF5 layout) into ``$nnUNet_raw/DatasetXXX_<name>`` with
    ``labeled`` labelled training patients, and write fold 0 of ``splits_final.json``. Returns the raw folder.

    ``spacing``: ``(x, y, z)`` mm written for HDF5 sources (default 1.5, 1.5, 10). Raises
    :class:`~nnunet_semiseg.conversion.common.InputDataError` subclasses, before writing anything, on bad input."""
    plan = plan_acdc(src, dataset_id, labeled, name=name, spacing=spacing, official_test=official_test)
    return execute_plan(plan, overwrite=overwrite, num_processes=num_processes)
