"""Weak and strong views of unlabelled patches with identical geometry (design §4).

Each unlabelled patch is cropped at random (no foreground oversampling: there are no labels), then goes through
nnU-Net's spatial augmentation **once** (rotation, scaling, mirroring; dummy-2D for anisotropic 3D data). That is
the *weak* view, the teacher's input. The *strong* view, the student's input, is the weak tensor plus
photometric perturbations (nnU-Net's own noise, blur, brightness, contrast, low-resolution and gamma transforms
at higher probabilities). No geometric change happens after the split, so voxel ``i`` of both views shows the
same anatomy: pseudo-labels and per-voxel contrast pair up without any warping.
"""
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits


def weak_transforms(patch_size, rotation_for_DA, mirror_axes, do_dummy_2d_data_aug: bool,
                    use_mask_for_norm=None) -> ComposeTransforms:
    """nnU-Net's spatial augmentation (the same SpatialTransform/Mirror settings as
    ``nnUNetTrainer.get_training_transforms``), applied to image and foreground mask together."""
    t = []
    if do_dummy_2d_data_aug:
        t.append(Convert3DTo2DTransform())
        spatial_patch = patch_size[1:]
    else:
        spatial_patch = patch_size
    t.append(SpatialTransform(spatial_patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                              p_rotation=0.2, rotation=rotation_for_DA, p_scaling=0.2, scaling=(0.7, 1.4),
                              p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                              border_mode_seg='constant', padding_value_seg=-1))
    if do_dummy_2d_data_aug:
        t.append(Convert2DTo3DTransform())
    if mirror_axes is not None and len(mirror_axes) > 0:
        t.append(MirrorTransform(allowed_axes=mirror_axes))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform(apply_to_channels=[i for i, m in enumerate(use_mask_for_norm) if m],
                                    channel_idx_in_seg=0, set_outside_to=0))
    return ComposeTransforms(t)


def strong_transforms(do_dummy_2d_data_aug: bool = False) -> ComposeTransforms:
    """Photometric perturbations only (geometry untouched): nnU-Net's intensity transforms with the
    probabilities raised from nnU-Net's 0.1-0.3 to 0.25-0.5, the strength the consistency methods rely on."""
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.35),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False, synchronize_axes=False,
                                              p_per_channel=0.5, benchmark=True), apply_probability=0.35),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.5),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.5),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True,
                                                       ignore_axes=(0,) if do_dummy_2d_data_aug else None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.5),
    ])


class UnlabeledDataLoader(nnUNetDataLoader):
    """Random patches of unlabelled cases as ``{'data_weak': [B, C, *patch], 'data_strong': [B, C, *patch],
    'keys': [B]}`` (float32 tensors, identical geometry; see the module docstring).

    Args:
        data: an nnU-Net dataset over ``<data_identifier>_unlabeled/`` (its "seg" is the nonzero mask).
        batch_size: patches per batch (drawn with replacement, like nnU-Net's loader).
        patch_size: the enlarged initial patch size nnU-Net crops before spatial augmentation.
        final_patch_size: the network's patch size.
        label_manager: nnU-Net's label manager (only for the parent class' bookkeeping).
        weak, strong: the two transform pipelines (``weak_transforms``, ``strong_transforms``).
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager, weak, strong):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=None)
        self.has_ignore = False  # unlabelled cases have no class_locations: always a random crop
        self.weak, self.strong = weak, strong

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        weak_all = strong_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, _ = self._data.load_case(key)
                lbs, ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[lo, hi] for lo, hi in zip(lbs, ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                mask = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if self.patch_size_was_2d:
                    image, mask = image[:, 0], mask[:, 0]
                weak = self.weak(image=image, segmentation=mask)['image']
                strong = self.strong(image=weak.clone())['image']
                if weak_all is None:
                    weak_all = torch.empty((self.batch_size, *weak.shape), dtype=torch.float32)
                    strong_all = torch.empty_like(weak_all)
                weak_all[j], strong_all[j] = weak, strong
        return {'data_weak': weak_all, 'data_strong': strong_all, 'keys': keys}

