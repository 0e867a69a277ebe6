"""The semi-supervised base trainer through nnUNetTrainerMeanTeacher, trained in-process on the tiny phantom:
checkpoints (stock keys, strict loading into nnU-Net's own network, teacher round trip), --c continuation (also
after a kill), 2d and 3d_fullres, the no-unlabelled-data warning, export for stock nnU-Net."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_trainer
from nnunet_semiseg.training.base import stop_loaders


@pytest.fixture(scope='module')
def trained_2d(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=1, iterations=2, fold=0)
    trainer.run_training()
    return trainer


def _stock_network(phantom, trainer):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    pm, cm = trainer.plans_manager, trainer.configuration_manager
    return nnUNetTrainer.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, trainer.dataset_json),
        trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)


def test_checkpoint_has_stock_keys_and_loads_strictly_into_nnunets_network(phantom, trained_2d):
    ckpt = torch.load(os.path.join(trained_2d.output_folder, 'checkpoint_final.pth'), weights_only=False)
    stock_keys = {'network_weights', 'optimizer_state', 'grad_scaler_state', 'logging', '_best_ema', 'current_epoch',
                  'init_args', 'trainer_name', 'inference_allowed_mirroring_axes'}
    assert stock_keys | {'semiseg_state'} == set(ckpt)
    assert ckpt['trainer_name'] == 'nnUNetTrainerMeanTeacher'
    net = _stock_network(phantom, trained_2d)
    net.load_state_dict(ckpt['network_weights'], strict=True)  # raises on any extra/missing key
    state = ckpt['semiseg_state']
    assert state['step'] == 2 and int(state['teacher']['averaged.n_averaged']) == 3  # init copy + 2 updates
    # the teacher is an average, not a copy of the student
    key = next(k for k in ckpt['network_weights'] if k.endswith('weight'))
    assert not torch.equal(state['teacher']['averaged.module.network.' + key], ckpt['network_weights'][key])


def test_loss_terms_are_logged_once_per_epoch_and_plotted(trained_2d):
    log = trained_2d.logger.local_logger.my_fantastic_logging
    assert len(log['train_supervised']) == len(log['train_consistency']) == len(log['train_losses']) == 1
    assert np.isfinite(log['train_consistency'][0]) and log['train_consistency'][0] >= 0
    assert os.path.isfile(os.path.join(trained_2d.output_folder, 'progress.png'))


def test_continue_restores_teacher_and_trains_on(phantom, trained_2d):
    ckpt_file = os.path.join(trained_2d.output_folder, 'checkpoint_final.pth')
    saved = torch.load(ckpt_file, weights_only=False)
    shutil.copytree(trained_2d.output_folder_base, trained_2d.output_folder_base + '_copy')
    resumed = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=2, iterations=2, fold=0,
                           continue_training=True)
    resumed.load_checkpoint(ckpt_file)
    for k, v in saved['semiseg_state']['teacher'].items():
        assert torch.equal(resumed.teacher.state_dict()[k].cpu(), v.cpu()), k
    assert resumed.semiseg_step == 2 and resumed.current_epoch == 1
    resumed.run_training()
    assert resumed.semiseg_step == 4
    log = resumed.logger.local_logger.my_fantastic_logging
    assert len(log['train_consistency']) == len(log['train_losses']) == 2


def test_killed_training_continues_from_checkpoint_latest(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=3, iterations=2, fold=1)
    trainer.save_every = 1
    original_step = trainer.train_step

    def dying_step(batch):
        if trainer.semiseg_step == 4:  # first step of the third epoch
            raise KeyboardInterrupt('killed')
        return original_step(batch)

    trainer.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training()
    latest = os.path.join(trainer.output_folder, 'checkpoint_latest.pth')
    assert os.path.isfile(latest) and not os.path.isfile(latest + '.tmp')
    resumed = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=3, iterations=2, fold=1,
                           continue_training=True)
    resumed.load_checkpoint(latest)
    assert resumed.current_epoch == 2 and resumed.semiseg_step == 4
    resumed.run_training()
    assert resumed.semiseg_step == 6 and os.path.isfile(os.path.join(resumed.output_folder, 'checkpoint_final.pth'))


def test_3d_fullres_trains(phantom):
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '3d_fullres', epochs=1, iterations=2, fold=0)
    trainer.run_training()
    log = trainer.logger.local_logger.my_fantastic_logging
    assert np.isfinite(log['train_supervised'][0]) and np.isfinite(log['train_consistency'][0])
    assert trainer.num_unlabeled_cases == len(phantom['cases']['unlabeled'])


def test_without_unlabeled_images_it_warns_and_trains_supervised_only(phantom):
    folder = os.path.join(phantom['raw'], 'imagesTrUnlabeled')
    os.rename(folder, folder + '_away')
    try:
        trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=1, iterations=1, fold=2)
        with pytest.warns(UserWarning, match='no unlabelled images'):
            trainer.run_training()
    finally:
        os.rename(folder + '_away', folder)
    assert trainer.dataloader_unlabeled is None
    log = trainer.logger.local_logger.my_fantastic_logging
    assert np.isnan(log['train_consistency'][0])
    assert log['train_losses'][0] == pytest.approx(log['train_supervised'][0])


def test_step_outputs_are_numpy_scalars_that_sum_to_the_loss(phantom):
    """nnU-Net keeps every step's outputs until the epoch ends. They are numpy scalars, with no tensor or array
    buffer behind them: kept arrays over tensors pinned glibc's heap, and Mean Teacher's peak memory grew by about
    1 GB per 250-step epoch (docs/benchmarks.md). The logged loss is the weighted sum of the logged terms."""
    from nnunet_semiseg.schedules import sigmoid_rampup
    trainer = make_trainer(phantom, 'nnUNetTrainerMeanTeacher', '2d', epochs=4, iterations=250, fold=1)  # ramp < 1
    trainer.on_train_start()
    try:
        outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
    finally:
        stop_loaders(trainer)
    for step, out in enumerate(outs):
        assert {type(out[k]) for k in ('loss', 'supervised', 'consistency')} == {np.float32}
        ramp = sigmoid_rampup(step, trainer.consistency_rampup_fraction * trainer.total_iterations)
        assert 0 < ramp < 1 and out['consistency'] > 0
        assert out['loss'] == pytest.approx(out['supervised'] + 0.1 * ramp * out['consistency'], rel=1e-5)


def _predict(model_folder, image_file):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device('cpu'), allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_folder, use_folds=(0,), checkpoint_name='checkpoint_final.pth')
    image, props = SimpleITKIO().read_images([image_file])
    return p.predict_single_npy_array(image, props, None, None, True)


def test_export_predicts_the_same_segmentation_with_stock_nnunet_names(phantom, trained_2d, tmp_path):
    from nnunet_semiseg.export import export_model_folder
    image = os.path.join(phantom['raw'], 'imagesTs', phantom['cases']['test'][0] + '_0000.nii.gz')
    target = export_model_folder(trained_2d.output_folder_base, str(tmp_path))
    ckpt = torch.load(os.path.join(target, 'fold_0', 'checkpoint_final.pth'), weights_only=False)
    assert ckpt['trainer_name'] == 'nnUNetTrainer' and 'semiseg_state' not in ckpt
    seg_ours, prob_ours = _predict(trained_2d.output_folder_base, image)
    seg_exported, prob_exported = _predict(target, image)
    np.testing.assert_array_equal(seg_ours, seg_exported)
    np.testing.assert_allclose(prob_ours, prob_exported)
    with pytest.raises(FileExistsError):
        export_model_folder(trained_2d.output_folder_base, str(tmp_path))
    teacher_target = export_model_folder(trained_2d.output_folder_base, str(tmp_path / 'teacher'), weights='teacher')
    seg_teacher, _ = _predict(teacher_target, image)
    assert seg_teacher.shape == seg_ours.shape
