"""EMA teacher: the update rule, its warm-up, no gradients, buffers, re-sync."""
import pytest
import torch
from torch import nn

from nnunet_semiseg.teacher import EMATeacher


def _student():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 1, 1))


def test_one_update_is_the_ema_formula():
    student = _student()
    teacher = EMATeacher(student, decay=0.99, warmup=False)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student)
    for t0, t, s in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s, rtol=0, atol=1e-6)


def test_warmup_averages_the_first_students():
    # d = min(0.99, 1 - 1/(n+1)): the 2nd update has d = 0.5, i.e. the plain mean of the two students
    student = _student()
    teacher = EMATeacher(student, decay=0.99, warmup=True)
    first = [p.clone() for p in student.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    teacher.update(student)
    for a, t, s in zip(first, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.5 * (a + s))


def test_teacher_has_no_gradients_and_stays_in_eval_mode():
    student = _student()
    teacher = EMATeacher(student)
    teacher.train()
    assert not teacher.module.training and not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 2, 8, 8))
    assert not out.requires_grad


def test_buffers_follow_the_student_and_integer_buffers_are_copied():
    student = _student()
    teacher = EMATeacher(student, decay=0.9, warmup=False)
    student.train()
    for _ in range(3):
        student(torch.randn(4, 2, 8, 8) * 5 + 2)
    teacher.update(student)
    bn_s, bn_t = student[1], teacher.module[1]
    assert int(bn_t.num_batches_tracked) == int(bn_s.num_batches_tracked) == 3
    torch.testing.assert_close(bn_t.running_mean, 0.9 * torch.zeros(3) + 0.1 * bn_s.running_mean)


def test_copy_from_resyncs_exactly():
    student = _student()
    teacher = EMATeacher(student, decay=0.99)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.copy_from(student)
    for t, s in zip(teacher.module.state_dict().values(), student.state_dict().values()):
        assert torch.equal(t, s)


def test_rejects_a_bad_decay():
    with pytest.raises(ValueError, match='decay'):
        EMATeacher(_student(), decay=1.0)
