# The folder nnU-Net's nnUNet_extTrainer discovery reads. nnU-Net imports each file here as a top-level module and
# purges it after the lookup, so the classes live in the installed package (importable, picklable, subclassable)
# and this module only re-exports them, with absolute imports (docs/design.md).
from nnunet_semiseg.training.action import nnUNetTrainerACTION, nnUNetTrainerACTIONpp  # noqa: F401
from nnunet_semiseg.training.mean_teacher import nnUNetTrainerMeanTeacher  # noqa: F401
from nnunet_semiseg.training.mona_arco import (nnUNetTrainerARCO_SAG, nnUNetTrainerARCO_SG,  # noqa: F401
                                               nnUNetTrainerMONA)
from nnunet_semiseg.training.controls import (nnUNetTrainer_jitter1, nnUNetTrainer_jitter2,  # noqa: F401
                                              nnUNetTrainer_jitter3)
