"""Tests of the masked-diffusion forward process and SFT loss (`perceptiondlm.diffusion.noise`, spec §3.7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, noise_inputs, sample_noise_levels


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(b: int = 4, seq: int = 12, vocab: int = 17, seed: int = 0):
    g = _gen(seed)
    eligible = torch.rand(b, seq, generator=g) < 0.6
    eligible[0] = False  # one sequence without answer tokens: adds 0 but counts in B
    eligible[1, :3] = True
    p = sample_noise_levels(b, generator=g)
    masked = mask_tokens(eligible, p, generator=g)
    masked[1, 0] = True  # at least one masked token
    logits = torch.randn(b, seq, vocab, generator=g)
    targets = torch.randint(vocab, (b, seq), generator=g)
    return logits, targets, masked, p, eligible


def _loop_loss(logits, targets, masked, p, eligible) -> torch.Tensor:
    """The formula of spec §3.7 written out over full (B, L, V) logits."""
    b, seq, _ = logits.shape
    total = logits.new_zeros(())
    for i in range(b):
        n = int(eligible[i].sum())
        for j in range(seq):
            if masked[i, j]:
                ce = F.cross_entropy(logits[i, j].float()[None], targets[i, j][None])
                total = total + ce / p[i] / n
    return total / b


def test_noise_levels_range():
    p = sample_noise_levels(10_000, eps=0.1, generator=_gen())
    assert p.shape == (10_000,)
    assert p.min() >= 0.1 and p.max() <= 1.0
    assert p.min() < 0.11 and p.max() > 0.99  # covers the whole interval


def test_mask_fraction_matches_p():
    eligible = torch.ones(3, 20_000, dtype=torch.bool)
    p = torch.tensor([0.05, 0.5, 0.9])
    masked = mask_tokens(eligible, p, generator=_gen())
    assert_close(masked.float().mean(dim=1), p, atol=0.02, rtol=0.0)


def test_mask_only_eligible_and_reproducible():
    g = _gen(3)
    eligible = torch.rand(8, 64, generator=g) < 0.5
    p = torch.ones(8)  # p = 1 masks every eligible token
    masked = mask_tokens(eligible, p, generator=_gen(1))
    assert torch.equal(masked, eligible)
    p = sample_noise_levels(8, generator=g)
    first = mask_tokens(eligible, p, generator=_gen(7))
    assert not (first & ~eligible).any()
    assert torch.equal(first, mask_tokens(eligible, p, generator=_gen(7)))


def test_loss_matches_full_logits_formula():
    logits, targets, masked, p, eligible = _random_batch()
    loss = diffusion_loss(logits[masked], targets[masked], masked, p, eligible)
    assert loss.shape == ()
    assert_close(loss, _loop_loss(logits, targets, masked, p, eligible))


def test_gradient_zero_at_unmasked_positions():
    logits, targets, masked, p, eligible = _random_batch(seed=1)
    logits.requires_grad_(True)
    diffusion_loss(logits[masked], targets[masked], masked, p, eligible).backward()
    assert (logits.grad[~masked] == 0).all()
    assert (logits.grad[masked].abs().sum(dim=-1) > 0).all()


def test_bf16_logits_upcast():
    logits, targets, masked, p, eligible = _random_batch(seed=2)
    ref = diffusion_loss(logits[masked], targets[masked], masked, p, eligible)
    low = logits.bfloat16()[masked].requires_grad_(True)
    loss = diffusion_loss(low, targets[masked], masked, p, eligible)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, atol=0.0, rtol=2e-2)
    loss.backward()
    assert low.grad.dtype == torch.bfloat16


def test_no_masked_token_gives_zero_with_grad():
    eligible = torch.ones(2, 5, dtype=torch.bool)
    masked = torch.zeros(2, 5, dtype=torch.bool)
    logits = torch.randn(0, 11, requires_grad=True)
    loss = diffusion_loss(logits, torch.zeros(0, dtype=torch.long), masked, torch.full((2,), 0.5), eligible)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 11)


def test_noise_inputs_replaces_exactly_masked_rows():
    embeds = torch.randn(2, 6, 4)
    masked = torch.tensor([[True, False, False, True, False, False], [False] * 5 + [True]])
    mask_row = torch.randn(4, requires_grad=True)
    out = noise_inputs(embeds, masked, mask_row)
    assert out.shape == embeds.shape
    assert torch.equal(out[~masked], embeds[~masked])
    assert torch.equal(out[masked], mask_row.detach().expand(3, 4))
    out.sum().backward()
    assert_close(mask_row.grad, torch.full((4,), 3.0))  # one gradient contribution per masked row
