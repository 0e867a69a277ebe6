"""Trainer variants for the real-ACDC tuning log (docs/tuning.md); one change each. nnU-Net records a trainer's
init arguments by name, so each variant spells out nnU-Net's signature."""
import torch

from nnunet_semiseg.training.action import nnUNetTrainerACTION, nnUNetTrainerACTIONpp
from nnunet_semiseg.training.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_semiseg.training.mona_arco import nnUNetTrainerARCO_SAG, nnUNetTrainerMONA


class nnUNetTrainerARCO_SAG_noEqv(nnUNetTrainerARCO_SAG):
    """ARCO_SAG without MONA's equivariance term (not in the ARCO paper; issue 10 allows it as ARCO's default if it
    costs no accuracy)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_equivariance = 0.0


class nnUNetTrainerMeanTeacher_w300(nnUNetTrainerMeanTeacher):
    """Mean Teacher with a consistency weight that moves the update: at the default 0.1 the consistency gradient is
    about 1/10,000 of the supervised one on real ACDC (docs/tuning.md); 300 puts it near 10-35 %."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_weight = 300.0


class nnUNetTrainerARCO_SAG_noEqv_ramp50(nnUNetTrainerARCO_SAG_noEqv):
    """ARCO_SAG_noEqv with the pseudo-label loss ramped in (sigmoid) over the first half of fine-tuning: the teacher
    at the start of fine-tuning is confidently wrong on much of the foreground (docs/tuning.md), and the term
    carries 2-14x the supervised gradient from its first step."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_rampup_fraction = 0.5


class nnUNetTrainerMeanTeacher_w10(nnUNetTrainerMeanTeacher):
    """Mean Teacher between the measured bounds: 0.1 is inert, 300 collapses (docs/tuning.md, runs 5 and 6)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_weight = 10.0


class nnUNetTrainerMeanTeacher_w30(nnUNetTrainerMeanTeacher):
    """Mean Teacher between the measured bounds: 0.1 is inert, 300 collapses (docs/tuning.md, runs 5 and 6)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_weight = 30.0


class nnUNetTrainerACTIONpp_ramp50(nnUNetTrainerACTIONpp):
    """ACTION++ with the pseudo-label loss ramped in (sigmoid) over the first half of fine-tuning: at seeds 0-2 it
    loses the HCM end-systolic frames, where the teacher that starts fine-tuning is confidently wrong
    (docs/tuning.md, runs 14-16)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_rampup_fraction = 0.5
        self.lambda_anco = self.lambda_ascl = 0.01   # ACTION++'s contrastive weights when run 17 ran


class nnUNetTrainerACTIONpp_c01(nnUNetTrainerACTIONpp):
    """ACTION++ with its contrastive terms at 0.1 instead of the released code's 0.01: at 0.01 they carry under 2 %
    of the supervised gradient (docs/tuning.md, "Which term drives the update"). ACTION++'s default since run 21:
    kept so that the runs' folders keep their name."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 0.1
        self.lambda_ascl = 0.1


class nnUNetTrainerARCO_SAG_c01(nnUNetTrainerARCO_SAG):
    """ARCO_SAG (its defaults, so without MONA's equivariance term) with its pixel contrast at 0.1 instead of the
    released code's 0.01: at 0.01 it carries under 2 % of the supervised gradient; the same change lifted ACTION++
    by 2.0-2.6 Dice (docs/tuning.md, runs 19-20)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_contrast = 0.1


class nnUNetTrainerACTION_c01(nnUNetTrainerACTION):
    """ACTION with its anatomical contrast at 0.1 instead of the released code's 0.01, as ACTION++'s c01 variant."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 0.1


class nnUNetTrainerACTIONpp_w1(nnUNetTrainerACTIONpp):
    """ACTION++ at its papers' fine-tuning weights: supervised, pseudo-label, anatomical and supervised contrast
    weighted equally (1 : 1 : 1 : 1; ACTION and ACTION++ papers), where the released code weights the two
    contrastive terms 0.01 (docs/action.md, D3) and our default 0.1 (run 22: 2.3 Dice under 0.1 at seed 0)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 1.0
        self.lambda_ascl = 1.0


class nnUNetTrainerACTIONpp_c001(nnUNetTrainerACTIONpp):
    """ACTION++ at the released code's contrastive weights, 0.01: its default until run 21, and the trainer of runs
    14-17 (their folders are named ``nnUNetTrainerACTIONpp``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 0.01
        self.lambda_ascl = 0.01


class nnUNetTrainerACTIONpp_w03(nnUNetTrainerACTIONpp):
    """ACTION++ with its two contrastive terms at 0.3: the point between the default 0.1 (run 20: 57.3 at seed 0) and
    the papers' 1 (run 22: 55.0), where the dose curve 0.01 / 0.1 / 1 has not been measured."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_anco = 0.3
        self.lambda_ascl = 0.3


class nnUNetTrainerACTIONpp_gate(nnUNetTrainerACTIONpp):
    """ACTION++ with its pseudo-label loss gated on the teacher: off until the teacher's Dice on the labelled rows is
    >= 0.5 for every class (nnunet_semiseg.gate), with no forced opening within the run (deadline 1.0), so that it
    tests one thing: whether the pseudo-label loss is what kept the right ventricle at 0 in run 32 (7 labelled
    patients, 4 x 250), where fine-tuning began before the teacher had found the RV. The library's default after run
    38: kept so that the runs' folders keep their name."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_gate_threshold = 0.5
        self.unsup_gate_deadline = 1.0


class nnUNetTrainerARCO_SAG_gate(nnUNetTrainerARCO_SAG):
    """ARCO_SAG with the pseudo-label gate at 0.5, as ``nnUNetTrainerACTIONpp_gate``, but forced open at half of
    fine-tuning at the latest (the library's deadline through run 38; now 1.0, never forced)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_gate_threshold = 0.5
        self.unsup_gate_deadline = 0.5


class nnUNetTrainerACTIONpp_nogate(nnUNetTrainerACTIONpp):
    """ACTION++ on the papers' schedule: pseudo-labels from the first fine-tuning step, whatever the teacher has found
    (``unsup_gate_threshold = None``): ``nnUNetTrainerACTIONpp`` through docs/tuning.md run 38."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_gate_threshold = None


class nnUNetTrainerARCO_SAG_nogate(nnUNetTrainerARCO_SAG):
    """ARCO_SAG on the papers' schedule, without the pseudo-label gate: what ``nnUNetTrainerARCO_SAG`` ran in
    docs/tuning.md runs 4-33."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_gate_threshold = None


class nnUNetTrainerACTIONpp_gate03(nnUNetTrainerACTIONpp):
    """ACTION++ with the pseudo-label gate opening at a teacher Dice of 0.3 instead of 0.5: at 4 x 250 the gate opened
    at iterations 407-426 (docs/tuning.md runs 40-49), leaving under 600 iterations for the pseudo-label loss."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unsup_gate_threshold = 0.3


class nnUNetTrainerMeanTeacher_w0(nnUNetTrainerMeanTeacher):
    """Mean Teacher's data path and step (8 student rows, EMA teacher, unlabelled stream) with its term off: how far a
    run moves when nothing but the computation around the supervised loss changes. At the default 0.1 the term's
    gradient is about 1/10,000 of the supervised one, yet seed 1 ended 7.9 Dice under plain (docs/tuning.md run 53)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_weight = 0.0


class nnUNetTrainerMONA_noEqv(nnUNetTrainerMONA):
    """MONA without its equivariance term (MONA's released 2D code, not the paper's method section): at seed 1 MONA
    ended 17.7 Dice under plain with the term on (docs/tuning.md run 54), and the same term cost ARCO_SAG 4.5 Dice at
    seed 0 (run 18). This sizes the term's share of MONA's loss; issue 10 also measures MONA's cost without it."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lambda_equivariance = 0.0
