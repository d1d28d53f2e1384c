"""FM-instructed initialisation: a SAM-family teacher distilled into a small student on the server's proxy set.

:mod:`~fedfms.distillation.losses` holds the KL + Dice loss, :mod:`~fedfms.distillation.teacher_cache`
the teacher's cached logits, and :mod:`~fedfms.distillation.prestage` the pre-stage that trains the
student before the federated rounds (run on the server by :class:`fedfms.fl.workflows.fminit.FMInstructedInit`).
"""

from fedfms.distillation.losses import DistillationLoss, bernoulli_kl
from fedfms.distillation.prestage import INIT_MODES, PrestageRecord, PrestageSettings, load_proxy, run_prestage
from fedfms.distillation.teacher_cache import TeacherLogits, TeacherSpec, teacher_logits

__all__ = [
    "INIT_MODES",
    "DistillationLoss",
    "PrestageRecord",
    "PrestageSettings",
    "TeacherLogits",
    "TeacherSpec",
    "bernoulli_kl",
    "load_proxy",
    "run_prestage",
    "teacher_logits",
]
