"""Distillation losses: soft labels (Hinton et al. 2015), features (FitNets), attention transfer (Zagoruyko &
Komodakis 2017), and their weighted sum.

Every loss is a mean over the batch, so a batch split across data-parallel ranks recombines exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimfx.errors import PassError

FEATURE_LOSSES = ("mse", "cosine")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    The T^2 factor keeps the soft term's gradient magnitude independent of T (Hinton et al. 2015, sec. 2).
    """
    if temperature <= 0:
        raise PassError(f"distill: temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """alpha * soft_kl(T) + (1 - alpha) * cross_entropy(student, labels).

    Without labels the hard term is dropped and the soft term is returned with weight 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise PassError(f"distill: alpha (weight of the soft-label term) must be in [0, 1], got {alpha}")
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (adapted) student and teacher features (FitNets hint loss)."""
    _same_shape(student, teacher, "feature_mse")
    return F.mse_loss(student, teacher)


def feature_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each sample's flattened features, averaged over the batch."""
    _same_shape(student, teacher, "feature_cosine")
    cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=1e-8)
    return (1.0 - cos).mean()


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a [N, C, H, W] feature: sum_c |f_c|^p, flattened to [N, H*W], L2-normalised."""
    if feature.dim() != 4:
        raise PassError(f"attention_map needs a [N, C, H, W] feature, got shape {list(feature.shape)}")
    return F.normalize(feature.abs().pow(p).sum(dim=1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over the batch of || Q_s - Q_t ||_2, Q the normalised attention maps (Zagoruyko & Komodakis, eq. 2).

    Channel counts may differ (they are summed out); spatial sizes must match.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise PassError(
            f"attention_transfer needs equal batch and spatial sizes, got student {list(student.shape)} and "
            f"teacher {list(teacher.shape)}: pair features of the same resolution stage"
        )
    return (attention_map(student, p) - attention_map(teacher, p)).norm(dim=1).mean()


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise PassError(f"{what}: student feature {list(student.shape)} and teacher feature "
                        f"{list(teacher.shape)} differ; adapt the student first (adapters.make_adapter)")


@dataclass(frozen=True)
class LossWeights:
    """How the distillation objective is weighted.

    temperature, alpha: of :func:`kd_loss`. feature: weight of the feature loss (``feature_loss``: mse |
    cosine) summed over the adapted pairs. attention: weight of :func:`attention_transfer` summed over the
    4-D pairs (raw, unadapted student features), with exponent ``attention_p``.
    """

    temperature: float = 4.0
    alpha: float = 0.5
    feature: float = 1.0
    feature_loss: str = "mse"
    attention: float = 0.0
    attention_p: float = 2.0

    def __post_init__(self) -> None:
        if self.feature_loss not in FEATURE_LOSSES:
            raise PassError(f"distill: feature_loss must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}")
        if self.feature < 0 or self.attention < 0:
            raise PassError(f"distill: loss weights must be >= 0, got feature={self.feature}, "
                            f"attention={self.attention}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                 adapted: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                 raw: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                 weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, float]]:
    """The total distillation loss and its parts (as floats, for logging).

    ``adapted``: (adapted student feature, teacher feature) pairs for the feature loss; ``raw``: (student
    feature, teacher feature) pairs before adaptation, for attention transfer (4-D pairs only).
    """
    total = kd_loss(student_logits, teacher_logits, labels, weights.temperature, weights.alpha)
    parts = {"kd": float(total.detach())}
    if weights.feature > 0 and adapted:
        fn = feature_mse if weights.feature_loss == "mse" else feature_cosine
        feat = sum(fn(s, t) for s, t in adapted)
        total = total + weights.feature * feat
        parts["feature"] = float(feat.detach())
    pairs_4d = [(s, t) for s, t in raw if s.dim() == 4 and t.dim() == 4]
    if weights.attention > 0 and pairs_4d:
        att = sum(attention_transfer(s, t, weights.attention_p) for s, t in pairs_4d)
        total = total + weights.attention * att
        parts["attention"] = float(att.detach())
    return total, parts
