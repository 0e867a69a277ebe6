"""Run at interpreter start by the root ``nnunet_semiseg.pth`` line: appends our trainer folder to
``nnUNet_extTrainer`` so that plain ``nnUNetv2_train -tr nnUNetTrainerMeanTeacher`` and ``nnUNetv2_predict``
find our trainers with no set-up. Stdlib only (it runs in every interpreter start); a user's own entries are
kept; ``NNUNET_SEMISEG_NO_AUTOENV=1`` switches it off."""
import os


def trainers_dir() -> str:
    """The folder holding the nnU-Net trainer classes: ``nnunet_semiseg/trainers`` in an installed wheel,
    ``<checkout>/trainers`` in a source checkout or editable install."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.join(pkg, 'trainers')
    if os.path.isdir(inside):
        return inside
    return os.path.join(os.path.dirname(pkg), 'trainers')


def register() -> None:
    if os.environ.get('NNUNET_SEMISEG_NO_AUTOENV'):
        return
    folder = trainers_dir()
    current = os.environ.get('nnUNet_extTrainer', '')
    if folder not in current.split(os.pathsep):
        os.environ['nnUNet_extTrainer'] = os.pathsep.join(p for p in (current, folder) if p)


register()
