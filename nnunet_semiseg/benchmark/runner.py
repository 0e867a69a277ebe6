"""Checks, settings, the CPU preset's plans, the evaluation cases, and the loop over runs (one subprocess each,
:mod:`nnunet_semiseg.benchmark.child`). Every check runs before any training; nothing a user made is overwritten
or deleted."""
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_semiseg.benchmark.report import BASELINE, CONTROL_PREFIX, aggregate, markdown, plot
from nnunet_semiseg.conversion.common import InputDataError

MAX_CONTROLS = 3  # nnunet_semiseg.training.controls defines _jitter1 to _jitter3
PRESETS = {'cpu': {'epochs': 4, 'iterations': 250}, 'full': {'epochs': 1000, 'iterations': 250}}
CPU_FEATURE_CAP = (16, 32, 64, 128, 256, 256)
CPU_BATCH = {'2d': 4, '3d': 2}
NNUNET_VAL_ITERATIONS = 50  # nnUNetTrainer.num_val_iterations_per_epoch
# settings that make two benchmarks' runs incomparable; trainers and seeds may be added to an OUT
COMPARED = ('dataset', 'configuration', 'plans', 'plans_sha256', 'fold', 'epochs', 'iterations_per_epoch',
            'val_iterations_per_epoch', 'device', 'evaluation_set')
EVALUATION_DIR = 'evaluation'


class BenchmarkInputError(InputDataError, ValueError):
    """Bad arguments or data, found before any compute: printed by the CLI as one line."""


def run_dir_name(trainer: str, seed: int) -> str:
    return f'{trainer}__seed{seed}'


# ---------------------------------------------------------------------------------------------- checks
def check_trainers(names: Sequence[str]) -> Dict[str, type]:
    """Every name resolves to an nnU-Net trainer class, looked up exactly as ``nnUNetv2_train -tr`` does."""
    import contextlib
    import io

    from nnunet_semiseg.discovery import find_trainer
    classes = {}
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
                classes[name] = find_trainer(name)
        except RuntimeError:
            raise BenchmarkInputError(
                f'unknown trainer {name!r} (-tr): neither nnU-Net nor nnunet-semiseg nor a folder in '
                f'nnUNet_extTrainer has a trainer class of that name; check the spelling (ours: '
                f'nnUNetTrainerMeanTeacher, nnUNetTrainerMONA, nnUNetTrainerARCO_SG, nnUNetTrainerARCO_SAG, '
                f'nnUNetTrainerACTION, nnUNetTrainerACTIONpp)') from None
    return classes


def _dataset_folders(dataset: str) -> Tuple[str, str, str]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    for var, value in (('nnUNet_raw', nnUNet_raw), ('nnUNet_preprocessed', nnUNet_preprocessed)):
        if value is None or not os.path.isdir(str(value)):
            raise BenchmarkInputError(f'{var} is not set or not a folder: export {var}=... as for nnUNetv2_train')
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise BenchmarkInputError(f'dataset {dataset!r} (-d): no Dataset{str(dataset).zfill(3)}_* folder in '
                                  f'nnUNet_raw or nnUNet_preprocessed; convert it (nnunet-semiseg convert ...) and '
                                  f'run nnUNetv2_plan_and_preprocess -d {dataset}') from None
    raw, pre = os.path.join(str(nnUNet_raw), name), os.path.join(str(nnUNet_preprocessed), name)
    if not os.path.isfile(os.path.join(raw, 'dataset.json')):
        raise BenchmarkInputError(f'{raw}/dataset.json does not exist: the benchmark reads the raw images of its '
                                  f'evaluation cases from nnUNet_raw/{name}')
    return name, raw, pre


def load_plans(pre: str, plans: str, configuration: str, dataset: str) -> dict:
    path = os.path.join(pre, plans + '.json')
    if not os.path.isfile(path):
        raise BenchmarkInputError(f'{path} does not exist: {dataset} is not planned with plans {plans!r} (-p); run '
                                  f'nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}')
    with open(path) as fh:
        plans_dict = json.load(fh)
    if configuration not in plans_dict['configurations']:
        raise BenchmarkInputError(f'configuration {configuration!r} (-c) is not in {path}; it has '
                                  f'{", ".join(plans_dict["configurations"])}')
    return plans_dict


def _data_identifier(plans: dict, configuration: str) -> str:
    cfg = plans['configurations'][configuration]
    while 'data_identifier' not in cfg and 'inherits_from' in cfg:
        cfg = plans['configurations'][cfg['inherits_from']]
    return cfg['data_identifier']


def check_preprocessed(pre: str, plans: dict, configuration: str, dataset: str, plans_name: str) -> None:
    folder = os.path.join(pre, _data_identifier(plans, configuration))
    has_data = os.path.isdir(folder) and any(f.endswith(('.b2nd', '.npz', '.npy')) for f in os.listdir(folder))
    if not has_data:
        raise BenchmarkInputError(f'{folder} holds no preprocessed case: {dataset} is planned but not preprocessed '
                                  f'for {configuration}; run nnUNetv2_preprocess -d {dataset} -c {configuration} '
                                  f'-plans_name {plans_name}')
    if not os.path.isfile(os.path.join(pre, 'dataset.json')):
        raise BenchmarkInputError(f'{pre}/dataset.json is missing: rerun nnUNetv2_plan_and_preprocess -d {dataset}')


def derive_cpu_plans(plans: dict, name: str) -> dict:
    """The CPU preset: features capped stage by stage at 16-32-64-128-256-256 (256 beyond), batch 4 in 2d and 2
    in 3d, everything else (patch size, ``data_identifier``, so the preprocessed data are shared) unchanged."""
    import copy
    derived = copy.deepcopy(plans)
    derived['plans_name'] = name
    for cname, cfg in derived['configurations'].items():
        kwargs = cfg.get('architecture', {}).get('arch_kwargs', {})
        if 'features_per_stage' in kwargs and 'n_stages' in kwargs:
            n = kwargs['n_stages']
            cap = (list(CPU_FEATURE_CAP) + [CPU_FEATURE_CAP[-1]] * n)[:n]
            kwargs['features_per_stage'] = [min(int(f), c) for f, c in zip(kwargs['features_per_stage'], cap)]
        if 'batch_size' in cfg:
            dim = len(cfg.get('patch_size', ())) or (2 if cname == '2d' else 3)
            cfg['batch_size'] = CPU_BATCH['2d' if dim == 2 else '3d']
    return derived


def plans_sha256(plans: dict) -> str:
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


def test_cases(raw: str, dataset_json: dict) -> Dict[str, Tuple[List[str], str]]:
    """``{case: (image files, label file)}`` of the labelled test cases (imagesTs with labelsTs), else empty."""
    images_dir, labels_dir = os.path.join(raw, 'imagesTs'), os.path.join(raw, 'labelsTs')
    if not (os.path.isdir(images_dir) and os.path.isdir(labels_dir)):
        return {}
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    ending = dataset_json['file_ending']
    cases = {}
    for files in create_lists_from_splitted_dataset_folder(images_dir, ending, num_processes=1):
        case = os.path.basename(files[0])[:-len('_0000' + ending)]
        label = os.path.join(labels_dir, case + ending)
        if os.path.isfile(label):
            cases[case] = (list(files), label)
    return cases


def validation_cases(raw: str, pre: str, dataset_json: dict, fold: int) -> Dict[str, Tuple[List[str], str]]:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    with open(os.path.join(pre, 'splits_final.json')) as fh:
        val = json.load(fh)[fold]['val']
    files = get_filenames_of_train_images_and_targets(raw, dataset_json)
    return {case: (list(files[case]['images']), files[case]['label']) for case in val}


def per_class_names(dataset_json: dict) -> Dict[int, str]:
    return {int(v): k for k, v in dataset_json['labels'].items() if not isinstance(v, (list, tuple))}


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        return
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        import shutil
        shutil.copyfile(src, dst)


def evaluation_folders(spec: dict) -> Tuple[str, str, int]:
    """``OUT/evaluation/{images,labels}``: links to the evaluation cases' files in nnU-Net's naming
    (``CASE_XXXX<ending>``, ``CASE<ending>``). Validation cases are read from ``splits_final.json`` (which nnU-Net
    writes on the first training if it is missing)."""
    with open(os.path.join(spec['raw_folder'], 'dataset.json')) as fh:
        dataset_json = json.load(fh)
    if spec['evaluation']['set'] == 'test':
        cases = test_cases(spec['raw_folder'], dataset_json)
    else:
        cases = validation_cases(spec['raw_folder'], spec['preprocessed_folder'], dataset_json, int(spec['fold']))
    root = os.path.join(spec['out'], EVALUATION_DIR)
    images, labels = os.path.join(root, 'images'), os.path.join(root, 'labels')
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    ending = dataset_json['file_ending']
    for case, (image_files, label_file) in cases.items():
        for channel, image in enumerate(image_files):
            _link(image, os.path.join(images, f'{case}_{channel:04d}{ending}'))
        _link(label_file, os.path.join(labels, case + ending))
    return images, labels, len(cases)


# ---------------------------------------------------------------------------------------------- settings
def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: str, data) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def check_out(out: str, settings: dict) -> Optional[dict]:
    """Refuse an OUT that is a file, holds other things than a benchmark, or holds a benchmark with other
    settings. Returns the existing benchmark.json (or None)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BenchmarkInputError(f'{out} (-o) is a file: pick a folder')
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    existing = _read_json(os.path.join(out, 'benchmark.json'))
    if existing is None:
        raise BenchmarkInputError(f'{out} (-o) is not empty and holds no benchmark.json: pick a new or empty folder '
                                  f'(nothing in it was touched)')
    old = existing['settings']
    differ = [f'{k} {old.get(k)!r} there, {settings[k]!r} here' for k in COMPARED if old.get(k) != settings[k]]
    if None not in (old.get('split_sha256'), settings.get('split_sha256')) \
            and old['split_sha256'] != settings['split_sha256']:
        differ.append(f'fold {settings["fold"]} of splits_final.json changed since')
    if differ:
        raise BenchmarkInputError(f'{out} (-o) holds a benchmark with other settings ({"; ".join(differ)}): pick '
                                  f'another -o OUT, or repeat its settings to add trainers or seeds (nothing in it '
                                  f'was touched)')
    return existing


def check_runs_unchanged(out: str, runs: Sequence[Tuple[int, str]], settings: dict, plans: dict, pre: str) -> None:
    """Refuse to skip or continue a run in ``out`` that its trainer would no longer make: a finished run would be
    reported under the trainer's name with the settings it ran with, and an interrupted one would continue with
    others. Compares the settings nnU-Net recorded when the run's training started (``debug.json``) with the trainer
    built now, in one subprocess (:func:`nnunet_semiseg.benchmark.child.check`)."""
    import tempfile
    listed = []
    for seed, trainer in runs:
        debug = os.path.join(out, run_dir_name(trainer, seed), settings['dataset'],
                             f'{trainer}__{settings["plans"]}__{settings["configuration"]}', f'fold_{settings["fold"]}',
                             'debug.json')
        if os.path.isfile(debug):
            listed.append({'trainer': trainer, 'seed': seed, 'debug_json': debug})
    if not listed:
        return
    spec = {'preprocessed_folder': pre, 'configuration': settings['configuration'], 'fold': settings['fold'],
            'epochs': settings['epochs'], 'iterations_per_epoch': settings['iterations_per_epoch'],
            'val_iterations_per_epoch': settings['val_iterations_per_epoch']}
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, 'check.json')
        _write_json(job, {'spec': spec, 'plans': plans, 'runs': listed})
        proc = subprocess.run([sys.executable, '-m', 'nnunet_semiseg.benchmark.child', '--check', job],
                              capture_output=True, text=True, env=dict(os.environ, nnUNet_results=tmp))
    result = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode != 0 or not result:
        raise BenchmarkInputError(f'could not compare the runs in {out} with the trainers as they are now:\n'
                                  f'{proc.stderr[-2000:]}')
    found = json.loads(result[0][len('RESULT '):])
    changed = [(item, found[item['debug_json']]) for item in listed if found[item['debug_json']]]
    if changed:
        lines = [f'  {item["trainer"]} seed {item["seed"]} ({os.path.relpath(os.path.dirname(item["debug_json"]), out)}'
                 f'): ' + '; '.join(f'{name} {then} there, {now} now' for name, then, now in differences)
                 for item, differences in changed]
        raise BenchmarkInputError(
            f'{len(changed)} run(s) in {out} were trained with other settings than their trainers have now (a default '
            f'changed, or a trainer was edited, since they ran):\n' + '\n'.join(lines) + '\nSkipping them would '
            'report their results under the trainers\' names, and continuing them would mix the two. Benchmark the '
            'trainers as they are now in another folder (-o NEW), or delete those run folders to redo them; nothing '
            'was run or changed.')


def collect_records(out: str) -> List[dict]:
    records = []
    for entry in sorted(os.listdir(out)):
        record = _read_json(os.path.join(out, entry, 'run.json'))
        if record is not None:
            records.append(record)
    return records


def write_outputs(out: str, settings: dict, records: List[dict]) -> dict:
    summary = aggregate(records, settings['baseline']) if records else None
    names = list(dict.fromkeys([settings['baseline']] + list(settings['trainers']) + [r['trainer'] for r in records]))
    settings = dict(settings, trainers=names,
                    seeds=sorted(set(settings['seeds']) | {int(r['seed']) for r in records}))
    order = {t: i for i, t in enumerate(names)}
    records = sorted(records, key=lambda r: (order.get(r['trainer'], len(order)), r['seed']))
    data = {'settings': settings, 'runs': records}
    if summary is not None:
        data['summary'] = summary
    _write_json(os.path.join(out, 'benchmark.json'), data)
    if records:
        with open(os.path.join(out, 'benchmark.md'), 'w') as fh:
            fh.write(markdown(settings, records, summary))
        plot(settings, records, os.path.join(out, 'benchmark.png'), summary)
    return data


# ---------------------------------------------------------------------------------------------- the benchmark
def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# A semi-supervised trainer's whole-run training time over plain nnU-Net's on the same data and schedule, for the
# estimate before any semi-supervised run has finished in the folder: ACTION++ measured 2.6-2.9x in four quiet
# whole runs on real ACDC (docs/benchmarks.md, "Whole real-data runs"), the other trainers 2.5-3.9x per step.
SEMI_SUPERVISED_TIME_X = 3.0


def _estimate(trainer: str, records: List[dict], baseline: str, semi_supervised: bool = False) -> Optional[float]:
    """Seconds one run of ``trainer`` will take, from the folder's finished runs (``records``; runs continued over
    several sessions are left out, their wall time is not one run's): its own mean; else, for a semi-supervised
    trainer, the baseline's times the mean multiple of the semi-supervised runs that finished (or
    ``SEMI_SUPERVISED_TIME_X`` before any has); else the baseline's. None before the baseline has finished."""
    def mean_time(name):
        times = [r['last_session_wall_s'] for r in records if r['trainer'] == name and r.get('sessions', 1) == 1]
        return sum(times) / len(times) if times else None

    own, base = mean_time(trainer), mean_time(baseline)
    if own is not None or base is None or trainer == baseline or not semi_supervised:
        return own if own is not None else base
    semi_names = dict.fromkeys(r['trainer'] for r in records if r.get('semi_supervised'))
    multiples = [t / base for t in map(mean_time, semi_names) if t is not None]
    return base * (sum(multiples) / len(multiples) if multiples else SEMI_SUPERVISED_TIME_X)


def run_benchmark(dataset: str, configuration: str, trainers: Sequence[str], out: str, seeds: Sequence[int] = (0,),
                  epochs: Optional[int] = None, iterations: Optional[int] = None, preset: Optional[str] = None,
                  plans: str = 'nnUNetPlans', device: Optional[str] = None, fold: int = 0,
                  val_iterations: Optional[int] = None, controls: int = 0, echo=print) -> dict:
    """Train plain nnU-Net and ``trainers`` on ``dataset`` for every seed, predict, evaluate, and write
    ``OUT/benchmark.{json,md,png}``. ``controls`` (0-3) adds the no-teach controls ``nnUNetTrainer_jitter1`` to
    ``_jitter<controls>`` to the trainers. Finished runs are skipped; interrupted ones continue. Returns
    benchmark.json's content. Raises :class:`BenchmarkInputError` before any compute for bad input."""
    import torch
    out = os.path.abspath(out)
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise BenchmarkInputError('--device cuda, but torch sees no CUDA device: use --device cpu')
    preset = preset or ('full' if device == 'cuda' else 'cpu')
    if preset not in PRESETS:
        raise BenchmarkInputError(f'--preset {preset!r}: choose cpu or full')
    epochs = PRESETS[preset]['epochs'] if epochs is None else int(epochs)
    iterations = PRESETS[preset]['iterations'] if iterations is None else int(iterations)
    val_iterations = NNUNET_VAL_ITERATIONS if val_iterations is None else int(val_iterations)
    for flag, value, low in (('--epochs', epochs, 1), ('--iterations', iterations, 1),
                             ('--val-iterations', val_iterations, 0), ('-f', fold, 0), ('--controls', controls, 0)):
        if value < low:
            raise BenchmarkInputError(f'{flag} {value}: must be at least {low}')
    if controls > MAX_CONTROLS:
        raise BenchmarkInputError(f'--controls {controls}: at most {MAX_CONTROLS} (nnUNetTrainer_jitter1 to '
                                  f'_jitter{MAX_CONTROLS}); more pairs of the no-teach spread come from more --seeds')
    seeds = sorted(set(int(s) for s in seeds))
    names = list(dict.fromkeys([BASELINE] + list(trainers) + [f'{CONTROL_PREFIX}{k}' for k in range(1, controls + 1)]))

    classes = check_trainers(names)
    name, raw, pre = _dataset_folders(str(dataset))
    source_plans = load_plans(pre, plans, configuration, str(dataset))
    check_preprocessed(pre, source_plans, configuration, str(dataset), plans)
    with open(os.path.join(raw, 'dataset.json')) as fh:
        dataset_json = json.load(fh)
    from nnunet_semiseg.evaluation import labels_from_dataset_json
    labels_from_dataset_json(dataset_json)  # region-based datasets are refused here, not after training

    derived_path = None
    if preset == 'cpu':
        plans_name = plans + '_cpu'
        used_plans = derive_cpu_plans(source_plans, plans_name)
        derived_path = os.path.join(pre, plans_name + '.json')
        existing = _read_json(derived_path)
        if existing is not None and existing != used_plans:
            raise BenchmarkInputError(
                f'{derived_path} exists and differs from the cpu preset derived from {plans}.json (edited, or '
                f'derived from older plans): benchmark with it as it is (--preset full -p {plans_name}) or move it '
                f'away')
        if existing is not None:
            derived_path = None  # nothing to write
    else:
        plans_name, used_plans = plans, source_plans

    splits = _read_json(os.path.join(pre, 'splits_final.json'))
    split_sha256 = None  # nnU-Net writes splits_final.json on the first training when it is missing
    if splits is not None and fold < len(splits):
        split_sha256 = hashlib.sha256(json.dumps(splits[fold], sort_keys=True).encode()).hexdigest()
    tests = test_cases(raw, dataset_json)
    if tests:
        evaluation = {'set': 'test', 'short': 'imagesTs',
                      'description': f'the {len(tests)} labelled test cases (imagesTs/labelsTs) of {name}'}
    else:
        n_folds = len(splits) if splits is not None else 5
        if fold >= n_folds:
            raise BenchmarkInputError(f'-f {fold}: {pre}/splits_final.json has {n_folds} fold(s) '
                                      f'(0-{n_folds - 1})' if splits is not None else
                                      f'-f {fold}: without splits_final.json nnU-Net makes folds 0-4')
        n_val = f'{len(splits[fold]["val"])} ' if splits is not None else ''
        evaluation = {'set': 'validation', 'short': f'fold {fold} validation',
                      'description': f'the {n_val}validation cases of fold {fold} (imagesTr/labelsTr, '
                                     f'splits_final.json) of {name}, which has no labelled test set '
                                     f'(imagesTs/labelsTs); they are not used for training or model selection'}

    from nnunet_semiseg.training.base import nnUNetTrainerSemiSupervised
    from nnunet_semiseg.unlabeled.discovery import UnlabeledDataError, find_unlabeled_cases
    semi = [t for t in names if issubclass(classes[t], nnUNetTrainerSemiSupervised)]
    n_unlabeled = None
    if semi:
        try:
            n_unlabeled = len(find_unlabeled_cases(raw, dataset_json))
        except UnlabeledDataError as error:
            raise BenchmarkInputError(str(error)) from None
        if not n_unlabeled:
            echo(f'warning: {name} has no unlabelled images (no {raw}/imagesTrUnlabeled/): {", ".join(semi)} '
                 f'train with their supervised terms only; their rows are marked †')

    settings = {
        'dataset': name, 'configuration': configuration, 'plans': plans_name, 'source_plans': plans,
        'preset': preset, 'plans_sha256': plans_sha256(used_plans), 'fold': fold, 'epochs': epochs,
        'iterations_per_epoch': iterations, 'val_iterations_per_epoch': val_iterations, 'device': device,
        'evaluation_set': evaluation['set'], 'evaluation': evaluation, 'split_sha256': split_sha256,
        'baseline': BASELINE,
        'checkpoint': 'checkpoint_final.pth', 'test_time_augmentation': False,
        'batch_size': used_plans['configurations'][configuration].get('batch_size'),
        'peak_memory': 'torch.cuda.max_memory_allocated' if device == 'cuda' else
                       'peak resident set size of the training process (augmentation workers excluded)',
        'nnUNet_n_proc_DA': os.environ.get('nnUNet_n_proc_DA', 'nnU-Net default'),
        'nnunetv2': _version('nnunetv2'),
        'torch': torch.__version__, 'trainers': names, 'seeds': seeds,
    }
    existing = check_out(out, settings)
    check_runs_unchanged(out, [(s, t) for s in seeds for t in names], settings, used_plans, pre)
    # -------------------------------------------------------------------- all checks passed: from here on we write
    os.makedirs(out, exist_ok=True)
    if derived_path is not None:
        _write_json(derived_path, used_plans)
        echo(f'wrote the cpu preset plans {derived_path} (same preprocessed data as {plans})')
    if existing is not None:
        settings['trainers'] = list(dict.fromkeys(existing['settings']['trainers'] + names))
        settings['seeds'] = sorted(set(existing['settings']['seeds']) | set(seeds))
    write_outputs(out, settings, collect_records(out))

    todo = [(s, t) for s in seeds for t in names]
    failed = []
    base_env = dict(os.environ, PYTHONUNBUFFERED='1')
    for k, (seed, trainer) in enumerate(todo, 1):
        run_dir = os.path.join(out, run_dir_name(trainer, seed))
        head = f'[{k}/{len(todo)}] {trainer} seed {seed}'
        if os.path.isfile(os.path.join(run_dir, 'run.json')):
            echo(f'{head}: finished earlier, skipped')
            continue
        records = collect_records(out)
        remaining = [_estimate(t, records, BASELINE, t in semi) for s, t in todo[k - 1:]
                     if not os.path.isfile(os.path.join(out, run_dir_name(t, s), 'run.json'))]
        this = remaining[0]
        eta = 'ETA after the first run' if this is None else \
            f'ETA this run ~{_hms(this)}, all remaining ~{_hms(sum(r or this for r in remaining))}'
        resumed = ' (continuing an interrupted run)' if os.path.isdir(run_dir) else ''
        echo(f'{head}: {epochs} x {iterations} iterations on {device}{resumed}; {eta}')
        os.makedirs(run_dir, exist_ok=True)
        spec = dict(settings, trainer=trainer, seed=seed, run_dir=run_dir, out=out, raw_folder=raw,
                    preprocessed_folder=pre, unlabeled_cases=n_unlabeled if trainer in semi else None)
        _write_json(os.path.join(run_dir, 'spec.json'), spec)
        env = dict(base_env, nnUNet_results=run_dir, PYTHONHASHSEED=str(seed))
        t0 = time.time()
        code = _run_child(spec, env, os.path.join(run_dir, 'train.log'), echo)
        if code != 0:
            failed.append(trainer + f' seed {seed}')
            echo(f'{head}: FAILED (exit code {code}) after {_hms(time.time() - t0)}; see {run_dir}/train.log; the '
                 f'next call continues it')
            continue
        data = write_outputs(out, settings, collect_records(out))
        record = next(r for r in data['runs'] if r['trainer'] == trainer and r['seed'] == seed)
        echo(f'{head}: done in {_hms(time.time() - t0)}, mean Dice {record["metrics"]["mean"]["dice"]:.4f}')
    data = write_outputs(out, settings, collect_records(out))
    data['failed'] = failed
    return data


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def _run_child(spec: dict, env: dict, log_path: str, echo) -> int:
    """Run the child, its whole output appended to ``log_path``, its progress lines echoed."""
    from nnunet_semiseg.benchmark.child import PROGRESS
    cmd = [sys.executable, '-m', 'nnunet_semiseg.benchmark.child', os.path.join(spec['run_dir'], 'spec.json')]
    with open(log_path, 'a') as log:
        log.write(f'\n===== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(cmd)}\n')
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        tail = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-20:]
            if line.startswith(PROGRESS):
                echo('    ' + line[len(PROGRESS):].strip())
        code = proc.wait()
    if code != 0:
        echo(''.join('    | ' + line for line in tail).rstrip())
    return code
