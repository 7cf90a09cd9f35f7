"""Distillers (mdistiller style): a student, a frozen teacher, and a loss of named terms."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.distill.balance import class_weights
from kdtool.distill.teacher import FrozenTeacher
from kdtool.errors import KdtoolError, check_choice

KD_LOSSES = ("soft_ce", "kl")


class Distiller(nn.Module):
    """Holds the student (the only trainable part) and calls the teacher.

    ``forward(x)`` returns ``(student_logits, teacher_logits, losses)`` where
    ``losses`` maps term names to scalar tensors; the training loop minimises
    their sum and logs each one.
    """

    def __init__(self, student: nn.Module, teacher: FrozenTeacher):
        super().__init__()
        self.student = student
        self.teacher = teacher  # a plain attribute: FrozenTeacher is not an nn.Module

    def losses(self, student_logits, teacher_logits) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        with torch.no_grad():
            teacher_logits = self.teacher(x).float()
        student_logits = self.student(x)
        return student_logits, teacher_logits, self.losses(student_logits.float(),
                                                           teacher_logits)


# Softened past use: at T = 1e308 the loss scaled by T^2 overflowed and read as divergence.
MAX_TEMPERATURE = 100.0


def check_temperature(temperature: float) -> None:
    if not 0 < temperature <= MAX_TEMPERATURE:
        raise KdtoolError(f"--temperature must be above 0 and at most {MAX_TEMPERATURE:g}, "
                          f"got {temperature:g}", "1 is the paper's; KD uses 1 to 20")


class NoiseKD(Distiller):
    """Match the teacher's softened outputs on noise.

    ``soft_ce``: cross-entropy between teacher and student softmax at
    temperature T, as the authors' code (no T^2; equal to KL up to the teacher's
    entropy, a constant).  ``kl``: KL(teacher || student) x T^2 (Hinton et al.),
    which keeps gradient size independent of T.

    ``class_weighted``: each sample's term is weighted so that every class the
    teacher predicts in the batch counts the same (``balance.class_weights``,
    ``--balance weight``); the weights have mean 1, so the loss keeps its scale.
    """

    def __init__(self, student: nn.Module, teacher: FrozenTeacher, temperature: float = 1.0,
                 loss: str = "soft_ce", class_weighted: bool = False):
        super().__init__(student, teacher)
        check_choice(loss, KD_LOSSES, "KD loss")
        check_temperature(temperature)
        self.temperature = temperature
        self.loss = loss
        self.class_weighted = class_weighted

    def losses(self, student_logits, teacher_logits) -> dict[str, torch.Tensor]:
        t = self.temperature
        log_p_s = F.log_softmax(student_logits / t, dim=1)
        if self.loss == "soft_ce":
            per_sample = -(F.softmax(teacher_logits / t, dim=1) * log_p_s).sum(1)
        else:
            log_p_t = F.log_softmax(teacher_logits / t, dim=1)
            per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * t * t
        if self.class_weighted:
            weights = class_weights(teacher_logits.argmax(1), teacher_logits.shape[1])
            return {self.loss: (weights * per_sample).mean()}
        return {self.loss: per_sample.mean()}
