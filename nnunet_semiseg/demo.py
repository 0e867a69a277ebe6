"""``nnunet-semiseg demo OUT_DIR``: the whole pipeline on a generated cardiac-like phantom, on CPU, in minutes.

1. generate a phantom dataset (short-axis-like volumes: LV blood pool, a thin myocardium ring (the rare class),
   an RV crescent) with labelled, validation, unlabelled (``imagesTrUnlabeled/``) and test cases;
2. ``nnUNetv2_plan_and_preprocess`` (nnU-Net's own API) and a CPU-sized derived plans file (``nnUNetPlans_demo``:
   narrower features, same preprocessed data);
3. train the plain ``nnUNetTrainer`` and ``nnUNetTrainerMeanTeacher`` with the same short schedule and seed;
4. predict the test cases with each and print a per-class Dice table.

nnU-Net's folders default to ``OUT_DIR/nnUNet_raw`` etc. when the user has none set.
"""
import json
import os
import shutil
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

LABELS = {'background': 0, 'LV': 1, 'MYO': 2, 'RV': 3}
DEMO_PLANS = 'nnUNetPlans_demo'


# ---------------------------------------------------------------------------------------------- the phantom
def phantom_case(rng: np.random.Generator, shape: Sequence[int] = (8, 64, 64)) -> Tuple[np.ndarray, np.ndarray]:
    """One short-axis-like volume ``[Z, Y, X]``: image (float32) and labels (uint8: 1 LV, 2 thin MYO ring, 3 RV).

    The LV is an ellipse that shrinks towards the apex, wrapped in a 1.5-2.5 voxel myocardium ring (a thin, rare
    class: about 4 % of the voxels); the RV is a crescent beside it. Intensities overlap between classes and carry
    noise and a smooth bias field, so a few labelled cases do not make the task trivial.
    """
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing='ij')
    nz, ny, nx = shape
    cy, cx = ny * rng.uniform(0.4, 0.6), nx * rng.uniform(0.4, 0.6)
    a, b = ny * rng.uniform(0.11, 0.16), nx * rng.uniform(0.11, 0.16)
    theta = rng.uniform(0, np.pi)
    thickness = rng.uniform(1.5, 2.5)
    apex = 1.0 - 0.6 * (z / max(nz - 1, 1)) ** 2  # radii shrink towards the apex
    u = ((y - cy) * np.cos(theta) + (x - cx) * np.sin(theta)) / (a * apex)
    v = (-(y - cy) * np.sin(theta) + (x - cx) * np.cos(theta)) / (b * apex)
    r = np.sqrt(u ** 2 + v ** 2)
    mean_radius = 0.5 * (a + b) * apex
    lv = r <= 1.0
    myo = (r > 1.0) & (r <= 1.0 + thickness / mean_radius)
    phi = rng.uniform(0, 2 * np.pi)
    offset = 1.6 * mean_radius
    ry, rx = cy + offset * np.sin(phi), cx + offset * np.cos(phi)
    rv = (np.sqrt((y - ry) ** 2 + (x - rx) ** 2) <= 1.25 * mean_radius) & ~lv & ~myo \
        & (r > 1.0 + (thickness + 1.5) / mean_radius)
    label = np.zeros(shape, np.uint8)
    label[rv], label[myo], label[lv] = 3, 2, 1

    means = {0: 0.45, 1: 0.9, 2: 0.3, 3: 0.72}
    image = np.zeros(shape, np.float32)
    for k, m in means.items():
        image[label == k] = m + rng.normal(0, 0.03)
    freq = rng.uniform(0.05, 0.15, size=2)
    image += 0.08 * np.sin(freq[0] * y + rng.uniform(0, 6)) * np.cos(freq[1] * x + rng.uniform(0, 6))
    bias = 1.0 + 0.25 * ((y - ny / 2) / ny * rng.uniform(-1, 1) + (x - nx / 2) / nx * rng.uniform(-1, 1))
    image = image * bias + rng.normal(0, 0.07, size=shape).astype(np.float32)
    return (image * 255).astype(np.float32), label


def make_phantom_dataset(raw_root: str, dataset_id: int = 990, name: str = 'SemiSegPhantom', n_labeled: int = 4,
                         n_val: int = 2, n_unlabeled: int = 12, n_test: int = 4,
                         shape: Sequence[int] = (8, 64, 64), spacing: Sequence[float] = (6.0, 1.5, 1.5),
                         seed: int = 0) -> Tuple[str, Dict[str, List[str]]]:
    """Write ``raw_root/DatasetXXX_<name>/`` in nnU-Net's layout plus ``imagesTrUnlabeled/``.

    Returns ``(dataset_folder, {'train': [...], 'val': [...], 'unlabeled': [...], 'test': [...]})``;
    ``spacing`` is in numpy axis order ``(z, y, x)`` in mm. Labelled train and validation cases both go to
    imagesTr (``numTraining`` counts them); the split is the caller's (:func:`write_split`).
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = os.path.join(raw_root, f'Dataset{dataset_id:03d}_{name}')
    for sub in ('imagesTr', 'labelsTr', 'imagesTrUnlabeled', 'imagesTs', 'labelsTs'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)

    def save(array, path, is_label=False):
        img = sitk.GetImageFromArray(array.astype(np.uint8) if is_label else array)
        img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
        sitk.WriteImage(img, path, True)

    cases = {'train': [f'phantom_{i:03d}' for i in range(n_labeled)],
             'val': [f'phantom_{i:03d}' for i in range(n_labeled, n_labeled + n_val)],
             'unlabeled': [f'unlabeled_{i:03d}' for i in range(n_unlabeled)],
             'test': [f'test_{i:03d}' for i in range(n_test)]}
    for case in cases['train'] + cases['val']:
        image, label = phantom_case(rng, shape)
        save(image, os.path.join(folder, 'imagesTr', f'{case}_0000.nii.gz'))
        save(label, os.path.join(folder, 'labelsTr', f'{case}.nii.gz'), True)
    for case in cases['unlabeled']:
        image, _ = phantom_case(rng, shape)
        save(image, os.path.join(folder, 'imagesTrUnlabeled', f'{case}_0000.nii.gz'))
    for case in cases['test']:
        image, label = phantom_case(rng, shape)
        save(image, os.path.join(folder, 'imagesTs', f'{case}_0000.nii.gz'))
        save(label, os.path.join(folder, 'labelsTs', f'{case}.nii.gz'), True)
    generate_dataset_json(folder, {0: 'MRI'}, LABELS, n_labeled + n_val, '.nii.gz', dataset_name=name,
                          description='nnunet-semiseg phantom: LV, thin myocardium ring, RV; '
                                      'imagesTrUnlabeled holds unlabelled cases')
    return folder, cases


def write_split(preprocessed_root: str, dataset_name: str, train: List[str], val: List[str]) -> str:
    """``splits_final.json`` with one fold: train = the labelled budget, val = the validation cases."""
    folder = os.path.join(preprocessed_root, dataset_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'splits_final.json')
    with open(path, 'w') as fh:
        json.dump([{'train': list(train), 'val': list(val)}], fh, indent=1)
    return path


def write_cpu_plans(preprocessed_dataset_folder: str, source: str = 'nnUNetPlans', name: str = DEMO_PLANS,
                    features: Sequence[int] = (8, 16, 32, 64), batch_size_2d: int = 8,
                    batch_size_3d: int = 2) -> str:
    """A derived plans file with narrower features and small batches that reuses the preprocessed data
    (same ``data_identifier``), so CPU training takes seconds per epoch."""
    with open(os.path.join(preprocessed_dataset_folder, source + '.json')) as fh:
        plans = json.load(fh)
    plans['plans_name'] = name
    for cname, cfg in plans['configurations'].items():
        if 'architecture' not in cfg:
            continue
        kwargs = cfg['architecture']['arch_kwargs']
        n = kwargs['n_stages']
        kwargs['features_per_stage'] = (list(features) + [features[-1]] * n)[:n]
        cfg['batch_size'] = batch_size_3d if cname.startswith('3d') else batch_size_2d
    path = os.path.join(preprocessed_dataset_folder, name + '.json')
    with open(path, 'w') as fh:
        json.dump(plans, fh, indent=2)
    return path


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str], num_processes: int,
                        progress: bool = True) -> None:
    """``nnUNetv2_plan_and_preprocess -d ID -c ... --verify_dataset_integrity`` through nnU-Net's own API.
    ``nnUNet_n_proc_DA=0`` (in-process augmentation) crashes nnU-Net's planner (``set_num_threads(0)``), so the
    variable is lifted while planning and restored after."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True, verbose=False,
                         show_progress_bar=progress)
    da = os.environ.pop('nnUNet_n_proc_DA', None)
    try:
        plan_experiments([dataset_id])
    finally:
        if da is not None:
            os.environ['nnUNet_n_proc_DA'] = da
    preprocess([dataset_id], configurations=list(configurations), num_processes=[num_processes],
               show_progress_bar=progress)


# ---------------------------------------------------------------------------------------------- the pipeline
def _set_default_env(out_dir: str) -> None:
    for var, sub in (('nnUNet_raw', 'nnUNet_raw'), ('nnUNet_preprocessed', 'nnUNet_preprocessed'),
                     ('nnUNet_results', 'nnUNet_results')):
        if not os.environ.get(var):
            os.environ[var] = os.path.join(out_dir, sub)
            os.makedirs(os.environ[var], exist_ok=True)
    # nnU-Net reads this one at import: 2 workers suit the 2-core machines this demo targets
    os.environ.setdefault('nnUNet_def_n_proc', str(min(2, os.cpu_count() or 1)))


def train_in_process(trainer_name: str, dataset_name: str, configuration: str, plans_identifier: str,
                     fold: int, epochs: int, iterations: int, val_iterations: int, seed: int, device: str = 'cpu'):
    """Train like ``nnUNetv2_train`` but in this process with a short schedule (the hyper-parameters are trainer
    attributes, set after construction as nnU-Net's own variants do); skips the final sliding-window validation."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_semiseg.discovery import find_trainer

    torch.manual_seed(seed)
    np.random.seed(seed)
    pre = os.path.join(str(nnUNet_preprocessed), dataset_name)
    cls = find_trainer(trainer_name)
    plans = load_json(os.path.join(pre, plans_identifier + '.json'))
    plans['continue_training'] = False  # what nnUNetv2_train sets (without --c)
    trainer = cls(plans, configuration, fold, load_json(os.path.join(pre, 'dataset.json')), torch.device(device))
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.run_training()
    return trainer


def predict_folder(model_folder: str, images_dir: str, out_dir: str, fold: int = 0, device: str = 'cpu',
                   use_mirroring: bool = False) -> List[str]:
    """Predict every ``*_0000<ending>`` case of ``images_dir`` in-process with nnU-Net's predictor."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=use_mirroring, device=torch.device(device),
                                allow_tqdm=False, verbose=False, verbose_preprocessing=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,),
                                                   checkpoint_name='checkpoint_final.pth')
    ending = load_json(os.path.join(model_folder, 'dataset.json'))['file_ending']
    os.makedirs(out_dir, exist_ok=True)
    rw = predictor.plans_manager.image_reader_writer_class()
    written = []
    for files in create_lists_from_splitted_dataset_folder(images_dir, ending, num_processes=1):
        case = os.path.basename(files[0])[:-len('_0000' + ending)]
        image, props = rw.read_images(files)
        seg = predictor.predict_single_npy_array(image, props, None, None, False)
        path = os.path.join(out_dir, case + ending)
        rw.write_seg(seg, path, props)
        written.append(path)
    return written


def dice_per_class(pred_dir: str, gt_dir: str, labels: Sequence[int]) -> Dict[int, float]:
    """Mean Dice per label over the cases of ``gt_dir`` (nnU-Net's own per-case metric computation)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    scores = {k: [] for k in labels}
    for name in sorted(os.listdir(gt_dir)):
        m = compute_metrics(os.path.join(gt_dir, name), os.path.join(pred_dir, name), SimpleITKIO(), list(labels))
        for k in labels:
            scores[k].append(m['metrics'][k]['Dice'])
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def run_demo(out_dir: str, configuration: str = '2d', epochs: int = 12, iterations: int = 25,
             val_iterations: int = 4, seed: int = 0, trainers: Sequence[str] = ('nnUNetTrainer', 'nnUNetTrainerMeanTeacher'),
             dataset_id: int = 990) -> Dict[str, Dict[int, float]]:
    t_start = time.time()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _set_default_env(out_dir)
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results

    def stage(msg):
        print(f'\n[nnunet-semiseg demo {time.time() - t_start:6.1f} s] {msg}', flush=True)

    name = 'SemiSegPhantom'
    dataset_name = f'Dataset{dataset_id:03d}_{name}'
    raw_folder = os.path.join(str(nnUNet_raw), dataset_name)
    if os.path.isdir(raw_folder):
        with open(os.path.join(raw_folder, 'dataset.json')) as fh:
            if 'nnunet-semiseg phantom' not in json.load(fh).get('description', ''):
                raise FileExistsError(f'{raw_folder} exists and is not a demo phantom: refusing to overwrite it. '
                                      f'Pass --dataset-id with a free id.')
        shutil.rmtree(raw_folder)
    stage(f'generating the phantom dataset in {raw_folder}')
    _, cases = make_phantom_dataset(str(nnUNet_raw), dataset_id, name, seed=seed)
    print(f'  labelled train {len(cases["train"])}, validation {len(cases["val"])}, '
          f'unlabelled {len(cases["unlabeled"])}, test {len(cases["test"])}')
    write_split(str(nnUNet_preprocessed), dataset_name, cases['train'], cases['val'])

    stage('nnU-Net planning and preprocessing (nnUNetv2_plan_and_preprocess)')
    plan_and_preprocess(dataset_id, [configuration], int(os.environ['nnUNet_def_n_proc']))
    pre_folder = os.path.join(str(nnUNet_preprocessed), dataset_name)
    write_cpu_plans(pre_folder)

    results = {}
    previous_da = os.environ.get('nnUNet_n_proc_DA')
    if previous_da is None:  # in-process augmentation is fastest on a couple of cores
        os.environ['nnUNet_n_proc_DA'] = '0'
    try:
        for trainer_name in trainers:
            stage(f'training {trainer_name} ({configuration}, {epochs} epochs x {iterations} iterations, CPU)')
            trainer = train_in_process(trainer_name, dataset_name, configuration, DEMO_PLANS, 0, epochs, iterations,
                                       val_iterations, seed)
            stage(f'predicting the test cases with {trainer_name}')
            pred_dir = os.path.join(out_dir, 'predictions', trainer_name)
            predict_folder(trainer.output_folder_base, os.path.join(raw_folder, 'imagesTs'), pred_dir)
            results[trainer_name] = dice_per_class(pred_dir, os.path.join(raw_folder, 'labelsTs'), [1, 2, 3])
    finally:
        if previous_da is None:
            os.environ.pop('nnUNet_n_proc_DA', None)

    stage('test-set Dice per class')
    names = {v: k for k, v in LABELS.items()}
    header = f'{"class":<10}' + ''.join(f'{t:>28}' for t in results)
    print(header)
    print('-' * len(header))
    for k in (1, 2, 3):
        print(f'{names[k]:<10}' + ''.join(f'{results[t][k]:>28.4f}' for t in results))
    print(f'{"mean":<10}' + ''.join(f'{np.mean(list(results[t].values())):>28.4f}' for t in results))
    print(f'\nmodels in {nnUNet_results}/{dataset_name}; predictions in {out_dir}/predictions; '
          f'total {time.time() - t_start:.0f} s')
    with open(os.path.join(out_dir, 'demo_results.json'), 'w') as fh:
        json.dump({t: {names[k]: v for k, v in r.items()} for t, r in results.items()}, fh, indent=1)
    return results


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('demo', help='phantom dataset -> plan -> train nnUNetTrainer and Mean Teacher -> '
                                           'predict -> Dice table (CPU, minutes)')
    p.add_argument('out_dir')
    p.add_argument('-c', '--configuration', default='2d', choices=['2d', '3d_fullres'])
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--iterations', type=int, default=25, help='iterations per epoch')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dataset-id', type=int, default=990)
    p.add_argument('--trainers', nargs='+', default=['nnUNetTrainer', 'nnUNetTrainerMeanTeacher'])
    p.set_defaults(func=lambda a: run_demo(a.out_dir, a.configuration, a.epochs, a.iterations, seed=a.seed,
                                           trainers=a.trainers, dataset_id=a.dataset_id) and 0)
