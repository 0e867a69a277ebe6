"""Mean Teacher for nnU-Net (Tarvainen & Valpola, NeurIPS 2017), as the semi-supervised medical segmentation
literature runs it (Yu et al. 2019; Luo et al., SSL4MIS): the student on the strong view of an unlabelled patch
matches the EMA teacher on the weak view, ``MSE(softmax(student), softmax(teacher))``, weighted by
``consistency_weight * sigmoid_rampup(step, rampup_fraction * total_iterations)``. Defaults: docs/mean_teacher.md.

The supervised loss reads only the labelled rows and the consistency only the unlabelled ones (its teacher target has
no gradient), so the unlabelled rows run as the base trainer's second pass, after the labelled pass's backward has
freed its graph: the same gradient, with one graph of the labelled batch's size alive at a time
(``unlabeled_second_pass = False``: one forward over both rows, the way the reference implementations write it)."""
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
        self.unlabeled_second_pass = True
        self.loss_term_names = ('consistency',)
        self._views = None

    def wants_second_pass(self) -> bool:
        return (self.unlabeled_second_pass and self.dataloader_unlabeled is not None
                and not self.rows_share_batch_statistics())

    def prepare_student_input(self, data, data_weak, data_strong):
        if data_strong is not None and self.wants_second_pass():
            self._views = (data_weak, data_strong)        # read in second_pass_terms
            return data, {'labeled': slice(0, data.shape[0])}
        return super().prepare_student_input(data, data_weak, data_strong)

    def compute_semisupervised_terms(self, batch):
        if 'unlabeled' not in batch.rows:          # no unlabelled stream, or its rows run in the second pass
            return {}
        return {'consistency': self._consistency(batch.logits('unlabeled'), batch.data_weak)}

    def second_pass_terms(self):
        if self._views is None:
            return {}
        data_weak, data_strong = self._views
        self._views = None
        output = self.forward_in_passes(self.network, data_strong, 'student')
        return {'consistency': self._consistency(output[0] if isinstance(output, (list, tuple)) else output,
                                                 data_weak)}

    def _consistency(self, student_logits: torch.Tensor, data_weak: torch.Tensor):
        """``(weight, MSE(softmax(student), softmax(teacher(weak))))`` for student logits ``[B_u, K, *patch]``."""
        teacher_logits, _ = self.teacher_forward(data_weak)
        student_prob = student_logits.float().softmax(1)
        consistency = F.mse_loss(student_prob, teacher_logits.float().softmax(1))
        ramp = sigmoid_rampup(self.semiseg_step, self.consistency_rampup_fraction * self.total_iterations)
        return self.consistency_weight * ramp, consistency
