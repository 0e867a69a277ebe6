"""nnunet-semiseg: semi-supervised, contrastive training for nnU-Net v2.

The library (samplers, losses, heads, EMA teacher, unlabelled data) is plain torch and imports nothing from
nnU-Net's training code at import time; the trainer classes live in the ``trainers`` folder that nnU-Net's
``nnUNet_extTrainer`` discovery reads (see ``nnunet_semiseg.discovery``)."""
__version__ = '0.1.0'
