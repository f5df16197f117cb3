"""Training losses as pure functions (no module state), computed in float32 whatever the input dtype.

- :func:`sdm_loss`: IRRA's Similarity Distribution Matching (DM-Adapter's main loss).
- :func:`load_balancing_loss`: DM-Adapter's per-layer expert load-balancing loss.
- :func:`symmetric_info_nce`: CLIP-style symmetric InfoNCE (DASD's CMA stage).
- DASD's other terms: :func:`feature_distillation`, :func:`semantic_consistency`, and the adversarial pair
  :func:`fool_discriminator` (the model's term) / :func:`discriminator_loss` (the discriminator's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["discriminator_loss", "feature_distillation", "fool_discriminator", "load_balancing_loss", "sdm_loss",
           "semantic_consistency", "symmetric_info_nce"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be 2-D [batch, dim] with batch >= 1, got shape {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _kl_rows(logits: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """mean_i sum_j softmax(logits)[i, j] * (log_softmax(logits)[i, j] - log_target[i, j])."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()


def sdm_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    person_ids: torch.Tensor,
    logit_scale: float = 50.0,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Similarity Distribution Matching loss (IRRA), a float32 scalar.

    With both feature sets L2-normalised, S = text @ image^T [B, B] and q the row-normalised matrix of
    same-person labels, the loss is KL(softmax(scale * S) || q) + KL(softmax(scale * S^T) || q), each KL taken
    per row (with ``log(q + epsilon)``) and averaged over rows. Row i of ``image_features`` and of
    ``text_features`` belong to the person ``person_ids[i]``.

    Args:
        image_features: [B, D] image embeddings.
        text_features: [B, D] text embeddings.
        person_ids: [B] integer person ids.
        logit_scale: fixed inverse temperature (50 = 1 / 0.02).
        epsilon: added to q inside the log so that zero targets stay finite.
    """
    _check_pair(image_features, text_features, "image_features", "text_features")
    if not isinstance(person_ids, torch.Tensor) or person_ids.dim() != 1:
        raise ValueError("person_ids must be a 1-D torch.Tensor")
    if person_ids.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"person_ids has {person_ids.shape[0]} entries but the batch has {image_features.shape[0]}"
        )
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    pids = person_ids.to(image.device).reshape(-1, 1)
    labels = (pids == pids.t()).float()  # symmetric, so it also serves S^T
    log_q = torch.log(labels / labels.sum(dim=1, keepdim=True) + epsilon)

    text_to_image = logit_scale * text @ image.t()
    t2i = _kl_rows(text_to_image, log_q)
    i2t = _kl_rows(text_to_image.t(), log_q)
    return t2i + i2t


def load_balancing_loss(router_probs: torch.Tensor, topk_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DM-Adapter's load-balancing loss for one MoE layer, a float32 scalar: ``sum_e P_e * f_e``.

    P_e is the mean over tokens of ``router_probs[:, e]`` (softmax over all E router logits); f_e is the
    fraction of tokens whose selected experts include e (so ``sum_e f_e = k``). f is a count and carries no
    gradient; the gradient flows through P only.

    Perfect balance (P_e = 1/E, f_e = k/E) gives ``sum_e (1/E)(k/E) = k/E``: 1/3 for k=2, E=6, so 24 layers
    weighted by 0.5 give 24 * 0.5 / 3 = 4.0. Collapse onto the same k experts gives up to 1 per layer.

    Args:
        router_probs: [S, E] per-token routing probabilities.
        topk_indices: [S, k] integer indices of the selected experts per token.
        num_experts: E.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(router_probs, torch.Tensor) or router_probs.dim() != 2:
        raise ValueError("router_probs must be a 2-D torch.Tensor [tokens, experts]")
    if router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs has {router_probs.shape[1]} columns but num_experts is {num_experts}")
    if router_probs.shape[0] == 0:
        raise ValueError("router_probs has no tokens")
    if not isinstance(topk_indices, torch.Tensor) or topk_indices.dim() != 2:
        raise ValueError("topk_indices must be a 2-D torch.Tensor [tokens, k]")
    if topk_indices.shape[0] != router_probs.shape[0]:
        raise ValueError(
            f"topk_indices has {topk_indices.shape[0]} tokens but router_probs has {router_probs.shape[0]}"
        )
    if topk_indices.is_floating_point() or topk_indices.dtype == torch.bool:
        raise ValueError(f"topk_indices must be an integer tensor, got {topk_indices.dtype}")
    if topk_indices.numel() and (int(topk_indices.min()) < 0 or int(topk_indices.max()) >= num_experts):
        raise ValueError(f"topk_indices must lie in [0, {num_experts})")

    probs = router_probs.float()
    selected = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    selected.scatter_(1, topk_indices.to(device=probs.device, dtype=torch.int64), True)
    fraction = selected.float().mean(dim=0)  # f_e, no gradient
    mean_prob = probs.mean(dim=0)  # P_e
    return (mean_prob * fraction).sum()


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE, a float32 scalar; row i of ``a`` and row i of ``b`` are the positive pair.

    ``(CE(scale * a b^T, arange) + CE(scale * b a^T, arange)) / 2`` over L2-normalised a and b.
    """
    _check_pair(a, b, "a", "b")
    a_n = F.normalize(a.float(), dim=-1)
    b_n = F.normalize(b.float(), dim=-1)
    logits = logit_scale * a_n @ b_n.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DASD: MSE between the target-language caption's feature and its English caption's (CLIP's) feature."""
    return F.mse_loss(student, teacher)


def semantic_consistency(f_sr: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:
    """DASD: the semantic-related feature should carry the caption's meaning: its distance to the anchor, ``l1``
    to the English caption's feature (stage CLA) and ``smooth_l1`` to the image's (stage CMA), as the release has
    them (``nn.L1Loss`` and ``nn.SmoothL1Loss``, means over all elements)."""
    if kind == "l1":
        return F.l1_loss(f_sr, anchor)
    assert kind == "smooth_l1", kind
    return F.smooth_l1_loss(f_sr, anchor)


def _bce_class(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """BCE-with-logits of two-way logits [B, 2] against the one-hot target of class ``cls`` (the release's GAN loss),
    a mean over all 2B outputs."""
    target = torch.zeros_like(logits)
    target[:, cls] = 1.0
    return F.binary_cross_entropy_with_logits(logits, target)


def discriminator_loss(mismatched_logits: torch.Tensor, own_logits: torch.Tensor) -> torch.Tensor:
    """DASD, the discriminator's loss: ``0.5 * (BCE(mismatched pairs, class 1) + BCE(own pairs, class 0))``."""
    return 0.5 * (_bce_class(mismatched_logits, 1) + _bce_class(own_logits, 0))


def fool_discriminator(mismatched_logits: torch.Tensor) -> torch.Tensor:
    """DASD, the model's adversarial term: BCE that pushes the discriminator's logits for mismatched (f_sa, g)
    pairs towards class 0 (a caption's own g), so f_sa cannot tell which g belongs to it."""
    return _bce_class(mismatched_logits, 0)
