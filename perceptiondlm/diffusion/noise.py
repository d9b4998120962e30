"""LLaDA's forward (noising) process and SFT loss (Nie et al., arXiv:2502.09992, Eq. 5; spec §3.7).

Each sequence draws a noise level p in [eps, 1] and masks each eligible (answer) token independently with
probability p. The model predicts the clean tokens at the masked positions and the loss is

    L = 1/B · Σ_b 1/n_b · Σ_{i masked in b} CE(logits_i, x_0^i) / p_b.

Why CE / p: masked diffusion's negative ELBO is E_t[1/t · Σ_i 1[x_t^i = M] · (−log p_θ(x_0^i | x_t))] (paper
Eq. 3, Eq. 5 for SFT); on average p·n tokens are masked, so dividing by p makes every noise level an unbiased
estimate of the same per-token bound. eps keeps p away from 0, where 1/p would explode.
Why 1/n_b: following LLaDA's SFT guidelines each sequence is normalised by its answer length, so short and long
answers weigh the same in the batch mean.

Everything here is a pure function of tensors; the mask token enters only as its embedding row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_noise_levels(
    batch: int, eps: float = 1e-3, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Per-sequence masking probability p = (1 − eps)·t + eps with t ~ U(0, 1); returns (B,) float32 in [eps, 1]."""
    t = torch.rand(batch, generator=generator, device=device)  # (B,)
    return (1.0 - eps) * t + eps


def mask_tokens(eligible: Tensor, p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mask each eligible token independently with its sequence's probability p_b.

    Args:
        eligible: (B, L) bool, True where a token may be masked (labels ≠ −100).
        p: (B,) masking probabilities, e.g. from `sample_noise_levels`.
        generator: must live on `eligible`'s device.

    Returns:
        (B, L) bool, the masked set; always a subset of `eligible`.
    """
    u = torch.rand(eligible.shape, generator=generator, device=eligible.device)  # (B, L)
    return (u < p.to(eligible.device)[:, None]) & eligible


def diffusion_loss(logits_masked: Tensor, targets: Tensor, masked: Tensor, p: Tensor, eligible: Tensor) -> Tensor:
    """LLaDA SFT loss (module docstring) from logits computed only at the masked positions.

    Args:
        logits_masked: (N, V) logits at the N masked positions, in the row-major order of `masked`'s True
            entries (the order `x[masked]` gives). Any dtype; the cross-entropy runs in fp32.
        targets: (N,) clean token ids at those positions (no shift: position-aligned).
        masked: (B, L) bool, the masked set; must be a subset of `eligible`.
        p: (B,) the masking probabilities the mask was drawn with.
        eligible: (B, L) bool; n_b = eligible.sum(1). Sequences with n_b = 0 add 0 but still count in B.

    Returns:
        Scalar loss. With no masked token it is 0 and still backpropagates (zero gradient).
    """
    batch = masked.shape[0]
    n = eligible.sum(dim=1).clamp(min=1)  # (B,); n_b = 0 implies no masked token in b
    weight = 1.0 / (p.float() * n)  # (B,)
    weight = weight[:, None].expand_as(masked)[masked]  # (N,), same order as logits_masked
    # fp32 CE: the reference scores fp32 logits (spec §3.7). With N = 0 the sum is an exact 0 that still has a
    # grad_fn back to logits_masked, so the empty case needs no branch.
    ce = F.cross_entropy(logits_masked.float(), targets, reduction="none")  # (N,)
    return (ce * weight).sum() / batch


def noise_inputs(input_embeds: Tensor, masked: Tensor, mask_embedding: Tensor) -> Tensor:
    """Replace the embeddings at masked positions by the mask token's embedding.

    The reference noises in embedding space, after vision features and RoI tokens were inserted (spec §3.7).
    Differentiable w.r.t. both `input_embeds` (unmasked rows) and `mask_embedding` (masked rows).

    Args:
        input_embeds: (B, L, D) clean input embeddings.
        masked: (B, L) bool, from `mask_tokens`.
        mask_embedding: (D,) the embedding row of the mask token.
    """
    return torch.where(masked[..., None], mask_embedding.to(input_embeds.dtype), input_embeds)  # (B, L, D)
