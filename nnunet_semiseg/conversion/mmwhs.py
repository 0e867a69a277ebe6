"""MM-WHS (Multi-Modality Whole Heart Segmentation, CT or MRI, 7 structures) to nnU-Net.

Layout: ``ct_train/ct_train_1NNN_image.nii.gz`` and ``ct_train_1NNN_label.nii.gz`` (likewise ``mr_train/``), or
``src`` being that folder itself. Label values 205, 420, 500, 550, 600, 820, 850 become 1..7 (MYO, LA, LV, RA,
RV, AO, PA); spacing from the NIfTI headers.

Split: ARCO's CT lists (``lists/mmwhs_*.txt``): 15 training, 5 test volumes; labelled = ARCO's ``train_5_``
(one volume) for ``labeled=1``, ``train_10_`` (two) for ``labeled=2``, otherwise the first N of ``train_all``.
The other training volumes go to imagesTrUnlabeled, the test volumes to imagesTs/labelsTs. For MRI
(``modality='mr'``) the same volume numbers are used (ARCO published no MRI split). As for LA, the test volumes
are also the validation cases unless ``val=N`` holds out the last N non-labelled training volumes.
"""
from pathlib import Path
from typing import Dict, Mapping, Optional

from nnunet_semiseg.conversion.common import (ConversionInputError, DatasetPlan, MissingInputError, SourceCase,
                                              UnknownLayoutError, builtin_list, execute_plan, hold_out_last,
                                              read_itk_pair)

MMWHS_LABELS = {'background': 0, 'MYO': 1, 'LA': 2, 'LV': 3, 'RA': 4, 'RV': 5, 'AO': 6, 'PA': 7}
MMWHS_LABEL_MAP = {0: 0, 205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}
# ARCO's labelled sets for the 5 % and 10 % settings, by number of labelled volumes
ARCO_BUDGET_LISTS = {1: 'mmwhs_train_5', 2: 'mmwhs_train_10'}


def detect_mmwhs_layout(src, modality: str) -> Path:
    """The folder holding ``<modality>_train_1NNN_image.nii.gz`` files: ``src/<modality>_train`` or ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise MissingInputError(f'{src} is not a folder: give the MM-WHS folder (with {modality}_train/)')
    for folder in (src / f'{modality}_train', src):
        if any(folder.glob(f'{modality}_train_*_image.nii*')):
            return folder
    raise UnknownLayoutError(f'{src}: no MM-WHS layout found. Expected {modality}_train/'
                             f'{modality}_train_1NNN_image.nii.gz and _label.nii.gz')


def plan_mmwhs(src, dataset_id: int, labeled: int, name: str = 'MMWHS', modality: str = 'ct',
               val: Optional[int] = None, value_aliases: Optional[Mapping[int, int]] = None) -> DatasetPlan:
    """Decide which MM-WHS volume goes where (see the module docstring) without reading image data.

    ``value_aliases``: extra raw label values accepted as another raw value (``{421: 420}`` reads a stray 421 as
    LA); values outside the standard seven and these aliases are an error."""
    if modality not in ('ct', 'mr'):
        raise ConversionInputError(f'--modality {modality!r} is invalid: use ct or mr')
    folder = detect_mmwhs_layout(src, modality)
    label_map: Dict[int, int] = dict(MMWHS_LABEL_MAP)
    for raw, meant in (value_aliases or {}).items():
        if meant not in MMWHS_LABEL_MAP:
            raise ConversionInputError(f'--map-value {raw}={meant}: {meant} is not an MM-WHS label value '
                                       f'({sorted(MMWHS_LABEL_MAP)})')
        label_map[int(raw)] = MMWHS_LABEL_MAP[meant]
    notes = [f'MM-WHS {modality.upper()}: {folder}', '  split: ARCO\'s lists (15 training, 5 test volumes)']

    def volume_id(ct_id: str) -> str:
        return ct_id.replace('ct_', f'{modality}_', 1)

    def make_case(case_id: str) -> SourceCase:
        files = {}
        for kind in ('image', 'label'):
            found = sorted(folder.glob(f'{case_id}_{kind}.nii*'))
            if not found:
                raise MissingInputError(f'{folder / (case_id + "_" + kind + ".nii.gz")} does not exist: restore it')
            files[kind] = found[0]
        return SourceCase(case_id, read_itk_pair, (str(files['image']), str(files['label'])), label_map,
                          f'{files["image"]} / {files["label"].name}')

    train = [volume_id(c) for c in builtin_list('mmwhs_train_all')]
    test = [volume_id(c) for c in builtin_list('mmwhs_test')]
    if not 1 <= labeled <= len(train):
        raise ConversionInputError(f'--labeled {labeled} is impossible: ARCO\'s MM-WHS split has {len(train)} '
                                   f'training volumes; choose 1 <= N <= {len(train)}')
    if labeled in ARCO_BUDGET_LISTS:
        labeled_ids = [volume_id(c) for c in builtin_list(ARCO_BUDGET_LISTS[labeled])]
        notes.append(f'  labelled: ARCO\'s {ARCO_BUDGET_LISTS[labeled].replace("mmwhs_", "")}_ list')
    else:
        labeled_ids = train[:labeled]
    if val is None:
        validation_ids = test
        notes.append('  validation = the test volumes (as ARCO\'s code); --val N holds out training volumes instead')
    else:
        validation_ids = hold_out_last(train, labeled_ids, val)
    unlabeled_ids = [c for c in train if c not in labeled_ids and c not in validation_ids]
    return DatasetPlan(
        dataset_id=dataset_id, name=name, channel_names={0: 'CT' if modality == 'ct' else 'MRI'},
        labels=dict(MMWHS_LABELS), labeled=[make_case(c) for c in labeled_ids],
        unlabeled=[make_case(c) for c in unlabeled_ids], validation=[make_case(c) for c in validation_ids],
        test=[make_case(c) for c in test],
        description=f'MM-WHS {modality.upper()}, {labeled} labelled training volume(s) (ARCO split), the others '
                    f'unlabelled in imagesTrUnlabeled',
        reference='Zhuang et al., Medical Image Analysis 58, 2019 (MM-WHS); split: You et al., ARCO, 2023',
        licence='see https://zmiclab.github.io/zxh/0/mmwhs/', notes=notes)


def convert_mmwhs(src, dataset_id: int, labeled: int, name: str = 'MMWHS', modality: str = 'ct',
                  val: Optional[int] = None, value_aliases: Optional[Mapping[int, int]] = None,
                  overwrite: bool = False, num_processes: int = 1) -> Path:
    """Convert MM-WHS (``modality`` ``'ct'`` or ``'mr'``) at ``src`` into ``$nnUNet_raw/DatasetXXX_<name>`` with
    ``labeled`` labelled volumes (ARCO's split) and write fold 0 of ``splits_final.json``. Returns the raw folder;
    bad input raises before anything is written."""
    plan = plan_mmwhs(src, dataset_id, labeled, name=name, modality=modality, val=val, value_aliases=value_aliases)
    return execute_plan(plan, overwrite=overwrite, num_processes=num_processes)


def parse_value_aliases(items) -> Dict[int, int]:
    """``['421=420']`` -> ``{421: 420}`` (the ``--map-value`` option)."""
    aliases = {}
    for item in items or []:
        try:
            raw, meant = (int(v) for v in item.split('='))
        except ValueError:
            raise ConversionInputError(f'--map-value {item!r} is invalid: use RAW=VALUE, e.g. 421=420') from None
        aliases[raw] = meant
    return aliases

