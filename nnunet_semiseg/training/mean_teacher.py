"""Mean Teacher for nnU-Net (Tarvainen & Valpola, NeurIPS 2017), as the semi-supervised medical segmentation
literature runs it (Yu et al. 2019; Luo et al., SSL4MIS): the student on the strong view of an unlabelled patch
matches the EMA teacher on the weak view, ``MSE(softmax(student), softmax(teacher))``, weighted by
``consistency_weight * sigmoid_rampup(step, rampup_fraction * total_iterations)``. Defaults: docs/mean_teacher.md."""
import torch
import torch.nn.functional as F

from nnunet_semiseg.schedules import sigmoid_rampup
from nnunet_semiseg.training.base import nnUNetTrainerSemiSupervised


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_weight = 0.1
        self.consistency_rampup_fraction = 0.25
        self.loss_term_names = ('consistency',)

    def compute_semisupervised_terms(self, batch):
        if not batch.has_unlabeled:
            return {}
        teacher_logits, _ = self.teacher_forward(batch.data_weak)
        student_prob = batch.logits('unlabeled').float().softmax(1)
        consistency = F.mse_loss(student_prob, teacher_logits.float().softmax(1))
        ramp = sigmoid_rampup(self.semiseg_step, self.consistency_rampup_fraction * self.total_iterations)
        return {'consistency': (self.consistency_weight * ramp, consistency)}
