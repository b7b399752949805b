"""Multi-teacher distillation: one student, several teachers, a head and a standardiser each."""

from featkd.multiteacher.loss import MultiTeacherLoss, Teacher, multi_teacher_loss
from featkd.multiteacher.standardize import PHIStandardize, RunningStandardize, hadamard_matrix

__all__ = [
    "MultiTeacherLoss",
    "PHIStandardize",
    "RunningStandardize",
    "Teacher",
    "hadamard_matrix",
    "multi_teacher_loss",
]
