"""``nnunet-semiseg evaluate PRED_DIR GT_DIR -o summary.json``: Dice, Jaccard, HD95 and ASD per case and class,
with distances in millimetres, as the semi-supervised segmentation literature reports them.

* Dice and Jaccard as nnU-Net computes them (``2 TP / (2 TP + FP + FN)``, ``TP / (TP + FP + FN)``).
* HD95: ``medpy.metric.binary.hd95`` (95th percentile of the surface distances of both directions, pooled).
* ASD: ``medpy.metric.binary.asd(prediction, reference)``, the mean distance from the prediction's surface to the
  reference's surface (one direction, as the literature's tables; not the symmetric ASSD).
* Spacing: read from the reference file with nnU-Net's reader (numpy axis order, matching the arrays), passed to
  medpy as ``voxelspacing``.
* Empty masks: both empty -> Dice, Jaccard, HD95, ASD all NaN (nnU-Net's convention: nothing to measure); one
  empty -> Dice 0, Jaccard 0, HD95 and ASD NaN (no surface to measure from). Means are NaN-means over cases; each
  class's mean reports how many cases it averaged (``n_cases``) and how many had undefined distances although a
  mask was non-empty (``n_distance_undefined``: missed or hallucinated structures).

Heavy imports (nnunetv2, medpy) stay inside the functions.
"""
import argparse
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_semiseg.conversion.common import InputDataError

METRICS = ('dice', 'jaccard', 'hd95', 'asd')
KNOWN_ENDINGS = ('.nii.gz', '.nii', '.nrrd', '.mha', '.mhd', '.tif', '.tiff', '.png', '.bmp')


class EvaluationInputError(InputDataError, ValueError):
    """Missing predictions, mismatching geometry, unknown labels: printed by the CLI as one line."""


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Metrics of one class. ``prediction``, ``reference``: bool arrays of the same shape; ``spacing``: mm per
    voxel along each array axis. Returns dice, jaccard (fractions), hd95, asd (mm), n_pred, n_ref (voxels);
    the empty-mask conventions are those of the module docstring."""
    from medpy.metric.binary import asd, hd95
    n_pred, n_ref = int(prediction.sum()), int(reference.sum())
    tp = int(np.logical_and(prediction, reference).sum())
    result = {'dice': float('nan'), 'jaccard': float('nan'), 'hd95': float('nan'), 'asd': float('nan'),
              'n_pred': n_pred, 'n_ref': n_ref}
    if n_pred + n_ref:
        result['dice'] = 2 * tp / (n_pred + n_ref)
        result['jaccard'] = tp / (n_pred + n_ref - tp)
    if n_pred and n_ref:
        result['hd95'] = float(hd95(prediction, reference, voxelspacing=spacing))
        result['asd'] = float(asd(prediction, reference, voxelspacing=spacing))
    return result


def evaluate_case(prediction_file: str, reference_file: str, labels: Optional[Sequence[int]], reader_class) -> dict:
    """Metrics of one prediction against its reference, for ``labels`` (None: every non-zero label found in
    either file). Spacing comes from the reference (nnU-Net reader, numpy axis order)."""
    reader = reader_class()
    reference, reference_props = reader.read_seg(reference_file)
    prediction, prediction_props = reader.read_seg(prediction_file)
    reference, prediction = reference[0], prediction[0]  # drop the channel axis: [z, y, x]
    spacing = [float(s) for s in reference_props['spacing']]
    if prediction.shape != reference.shape:
        raise EvaluationInputError(f'{prediction_file}: shape {prediction.shape} differs from the reference '
                                   f'{reference.shape} ({reference_file}); predictions must be on the reference grid')
    if not np.allclose(prediction_props['spacing'], spacing, rtol=1e-3):
        raise EvaluationInputError(f'{prediction_file}: spacing {list(prediction_props["spacing"])} differs from the '
                                   f'reference {spacing} ({reference_file}); predictions must be on the reference '
                                   f'grid')
    if labels is None:
        labels = [int(v) for v in np.union1d(np.unique(reference), np.unique(prediction)) if v != 0]
    metrics = {str(label): binary_metrics(prediction == label, reference == label, spacing) for label in labels}
    return {'prediction_file': str(prediction_file), 'reference_file': str(reference_file), 'spacing': spacing,
            'metrics': metrics}


def _detect_ending(folder: Path) -> str:
    counts = Counter(next((e for e in KNOWN_ENDINGS if p.name.endswith(e)), None) for p in folder.iterdir()
                     if p.is_file())
    counts.pop(None, None)
    if not counts:
        raise EvaluationInputError(f'{folder} holds no segmentation file ({", ".join(KNOWN_ENDINGS)})')
    return counts.most_common(1)[0][0]


def labels_from_dataset_json(dataset_json: dict) -> List[int]:
    """The non-background, non-ignore integer labels of a dataset.json (region-based datasets are refused)."""
    labels = []
    for name, value in dataset_json['labels'].items():
        if isinstance(value, (list, tuple)):
            raise EvaluationInputError(f'label {name!r} is a region {value}: region-based datasets are not '
                                       f'supported, pass the integer labels with -l')
        if int(value) != 0 and name != 'ignore':
            labels.append(int(value))
    return sorted(labels)


def _nanmean(values: List[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN -> NaN is the intended result
        return float(np.nanmean(values)) if values else float('nan')


def evaluate_folder(prediction_folder, reference_folder, output_file=None, labels: Optional[Sequence[int]] = None,
                    dataset_json_file=None, file_ending: Optional[str] = None, num_processes: int = 1,
                    chill: bool = False) -> dict:
    """Evaluate every reference file of ``reference_folder`` against the same-named file of
    ``prediction_folder``.

    ``labels``: classes to evaluate (default: those of ``dataset_json_file`` if given, else every non-zero
    label found in the references). ``file_ending``: default from the dataset.json, else the most common
    segmentation ending in ``reference_folder``. ``chill``: skip references without a prediction instead of
    raising. Returns (and writes to ``output_file`` if given) ``{"mean": {"<label>": {dice, jaccard, hd95, asd,
    n_cases, n_distance_undefined}}, "foreground_mean": {...}, "metric_per_case": [...], "labels": [...]}``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    prediction_folder, reference_folder = Path(prediction_folder), Path(reference_folder)
    for folder in (prediction_folder, reference_folder):
        if not folder.is_dir():
            raise EvaluationInputError(f'{folder} is not a folder')
    dataset_json = None
    if dataset_json_file is not None:
        if not Path(dataset_json_file).is_file():
            raise EvaluationInputError(f'{dataset_json_file} does not exist: give the dataset.json of the dataset')
        dataset_json = load_json(str(dataset_json_file))
    if labels is None and dataset_json is not None:
        labels = labels_from_dataset_json(dataset_json)
    ending = file_ending or (dataset_json['file_ending'] if dataset_json else _detect_ending(reference_folder))
    references = sorted(p for p in reference_folder.iterdir() if p.is_file() and p.name.endswith(ending))
    if not references:
        raise EvaluationInputError(f'{reference_folder} holds no file ending in {ending}')
    missing = [p.name for p in references if not (prediction_folder / p.name).is_file()]
    if missing and not chill:
        raise EvaluationInputError(f'{len(missing)} reference case(s) have no prediction in {prediction_folder}, '
                                   f'e.g. {missing[0]}; predict them or pass --chill to skip them')
    references = [p for p in references if p.name not in missing]
    if not references:
        raise EvaluationInputError(f'no prediction in {prediction_folder} matches a file of {reference_folder}')
    reader_class = determine_reader_writer_from_file_ending(ending, str(references[0]), verbose=False)

    jobs = [(str(prediction_folder / p.name), str(p), list(labels) if labels is not None else None, reader_class)
            for p in references]
    from nnunet_semiseg.conversion.common import run_jobs
    per_case = run_jobs(evaluate_case, jobs, num_processes, 'evaluating')

    if labels is None:  # every label of the references, as the cases' own lists also hold predicted-only labels
        labels = sorted({int(k) for case in per_case for k, m in case['metrics'].items() if m['n_ref'] > 0})
    labels = [int(label) for label in labels]
    for case in per_case:  # a label absent from both files of a case: both empty
        case['metrics'] = {str(label): case['metrics'].get(str(label), {
            'dice': float('nan'), 'jaccard': float('nan'), 'hd95': float('nan'), 'asd': float('nan'),
            'n_pred': 0, 'n_ref': 0}) for label in labels}

    mean = {}
    for label in labels:
        values = [case['metrics'][str(label)] for case in per_case]
        mean[str(label)] = {metric: _nanmean([v[metric] for v in values]) for metric in METRICS}
        mean[str(label)]['n_cases'] = sum(1 for v in values if v['n_pred'] + v['n_ref'] > 0)
        mean[str(label)]['n_distance_undefined'] = sum(1 for v in values if (v['n_pred'] > 0) != (v['n_ref'] > 0))
    foreground_mean = {metric: float(np.mean([mean[str(label)][metric] for label in labels])) if labels
                       else float('nan') for metric in METRICS}
    summary = {'labels': labels, 'mean': mean, 'foreground_mean': foreground_mean, 'metric_per_case': per_case,
               'conventions': {'distance_unit': 'mm', 'asd': 'medpy asd(prediction, reference): prediction '
                                                         'surface to reference surface',
                               'both_empty': 'all metrics NaN', 'one_empty': 'dice 0, jaccard 0, hd95/asd NaN',
                               'means': 'NaN-mean over cases'}}
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        save_json(summary, str(output_file), sort_keys=False)
    return summary


def format_table(summary: dict) -> str:
    """The per-class means as a text table."""
    rows = [f'{"label":>8} {"dice":>8} {"jaccard":>8} {"hd95 mm":>9} {"asd mm":>8} {"cases":>6}']
    for label, values in summary['mean'].items():
        rows.append(f'{label:>8} {values["dice"]:8.4f} {values["jaccard"]:8.4f} {values["hd95"]:9.3f} '
                    f'{values["asd"]:8.3f} {values["n_cases"]:6d}')
    fg = summary['foreground_mean']
    rows.append(f'{"mean":>8} {fg["dice"]:8.4f} {fg["jaccard"]:8.4f} {fg["hd95"]:9.3f} {fg["asd"]:8.3f}')
    return '\n'.join(rows)


def _run(args: argparse.Namespace) -> int:
    try:
        summary = evaluate_folder(args.prediction_folder, args.reference_folder, args.output, labels=args.labels,
                                  dataset_json_file=args.djfile, file_ending=args.file_ending,
                                  num_processes=args.num_processes, chill=args.chill)
    except InputDataError as error:
        print(f'nnunet-semiseg evaluate: error: {error}', file=sys.stderr)
        return 1
    print(format_table(summary))
    print(f'{len(summary["metric_per_case"])} cases; written to {args.output}')
    return 0


def add_parser(subparsers) -> None:
    """Register ``evaluate``."""
    parser = subparsers.add_parser(
        'evaluate', help='Dice, Jaccard, HD95 and ASD (mm) of a folder of predictions',
        description='Per case and per class Dice, Jaccard, HD95 and ASD (millimetres, spacing from the reference '
                    'files; ASD from the prediction surface to the reference surface, medpy). Note the argument '
                    'order: predictions first (nnUNetv2_evaluate_folder takes the references first).')
    parser.add_argument('prediction_folder', metavar='PRED_DIR', help='folder of predicted segmentations')
    parser.add_argument('reference_folder', metavar='GT_DIR', help='folder of reference segmentations (same names)')
    parser.add_argument('-o', '--output', required=True, help='summary JSON file to write')
    parser.add_argument('-l', '--labels', type=int, nargs='+',
                        help='labels to evaluate (default: dataset.json labels with -djfile, else every non-zero '
                             'label in the references)')
    parser.add_argument('-djfile', help='dataset.json giving the labels and the file ending')
    parser.add_argument('--file-ending', help='segmentation file ending (default: from -djfile, else detected)')
    parser.add_argument('-np', '--num-processes', type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help='worker processes (default min(4, CPU count))')
    parser.add_argument('--chill', action='store_true', help='skip reference cases that have no prediction')
    parser.set_defaults(func=_run)
