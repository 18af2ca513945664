"""Knowledge distillation losses, in one place.

`kd_loss` is Hinton et al. (2015): KL divergence between the teacher's and the student's
softened distributions at temperature T, scaled by T² so its gradients keep their size as T
changes, mixed with the hard-label cross-entropy by `alpha`. `DistillLoss` is the trainer's
loss function for a distillation stage: it runs the teachers (eval mode, no grad), averages
their logits (ensemble distillation), and adds the intermediate-layer terms of `FeatureMatch`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.distill.features import FeatureMatch


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, labels).

    Args:
        student_logits: (batch, classes).
        teacher_logits: (batch, classes); treated as constants.
        labels: (batch,) class indices.
        temperature: T > 0; higher softens both distributions.
        alpha: weight of the soft-target term in [0, 1]; 0 is plain cross-entropy.
    """
    student_logits = student_logits.float()
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def split_labels(labels: Any) -> tuple[Tensor, Tensor | None]:
    """Labels as batches carry them: a tensor, or (labels, cached teacher logits)."""
    if isinstance(labels, (tuple, list)):
        return labels[0], labels[1]
    return labels, None


class DistillLoss(nn.Module):
    """`loss(student, inputs, labels)` for the trainer: KD to the teachers' mean logits plus
    weighted intermediate-layer losses.

    The teachers are held outside the module's parameters (they are neither trained nor saved
    with the loss); the feature projections are parameters, so the trainer trains and
    checkpoints them.

    Args:
        teachers: trained models; put in eval mode and never given gradients.
        temperature: KD temperature T > 0.
        alpha: weight of the soft-target term in [0, 1].
        features: intermediate-layer matching (None for logits only).
    """

    def __init__(self, teachers: Sequence[nn.Module], temperature: float, alpha: float, features: FeatureMatch | None = None) -> None:
        super().__init__()
        self._teachers = list(teachers)  # a plain list: not submodules, so not trained or saved
        for teacher in self._teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.features = features

    def logged(self, trainer: Any) -> dict[str, float]:
        """The KD weight, logged with every step so reports draw it beside the lr."""
        return {"kd_weight": self.alpha}

    def teacher_logits(self, inputs: Any) -> Tensor:
        """Mean logits of the teachers on `inputs` (no grad)."""
        with torch.no_grad():
            outputs = [forward(teacher, inputs).float() for teacher in self._teachers]
        return torch.stack(outputs).mean(dim=0)

    def forward(self, student: nn.Module, inputs: Any, labels: Any) -> Tensor:  # type: ignore[override]
        labels, cached = split_labels(labels)
        features = self.features
        if features is not None:
            features.start()
        try:
            student_logits = forward(student, inputs)
            teacher_logits = cached if cached is not None else self.teacher_logits(inputs)
            loss = kd_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)
            if features is not None:
                loss = loss + features.loss()
        finally:
            if features is not None:
                features.stop()
        return loss
