"""Samplers driven by scripted logits (no model) and by the golden LLaDA: schedules, parity, thresholds."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from perceptiondlm import PerceptionDLMError
from perceptiondlm.diffusion.sampler import (
    Sampling,
    block_decode,
    filter_logits,
    mask_predict_decode,
    threshold_decode,
    transfer_schedule,
)
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.processing.tokens import SpecialTokens

MASK, EOT, V = 0, 1, 16


def scripted(steps_logits: list[torch.Tensor] | torch.Tensor):
    """A forward that returns the s-th scripted (B, N, V) logits at the scored positions, recording inputs."""
    seen = []

    def forward(x, score):
        seen.append((x.clone(), score.clone()))
        return steps_logits[len(seen) - 1][score]

    return forward, seen


def favouring(answer: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """(B, N, V) logits whose argmax is `answer`, with per-position confidence set by `margin`."""
    logits = torch.zeros(*answer.shape, V)
    logits.scatter_(-1, answer[..., None], margin[..., None])
    return logits


def test_transfer_schedule_is_linear():
    schedule = transfer_schedule(torch.tensor([10, 3, 8]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [2, 2, 2, 2]]


@pytest.mark.parametrize(("length", "block", "steps"), [(8, 8, 8), (8, 4, 4), (12, 4, 6), (8, 8, 3)])
def test_block_decode_follows_the_published_schedule(length, block, steps):
    answer = torch.arange(2, 2 + length)[None]
    margin = torch.linspace(1, 5, length)[None]  # later positions more confident
    forward, seen = scripted([favouring(answer, margin)] * steps)
    result = block_decode(forward, torch.full((1, length), MASK), MASK, steps=steps, block_length=block,
                          sampling=Sampling())
    assert torch.equal(result.tokens, answer)
    assert result.stats.nfe == steps == len(seen)
    per_block = steps // (length // block)
    expected = transfer_schedule(torch.tensor([block]), per_block)[0].tolist() * (length // block)
    masks_left = [int((x == MASK).sum()) for x, _ in seen] + [0]
    assert [a - b for a, b in zip(masks_left, masks_left[1:], strict=False)] == expected
    for x, score in seen:  # only masked positions of the current block are scored
        assert torch.equal(score, score & (x == MASK))
        blocks = {int(i) // block for i in score[0].nonzero()}
        assert len(blocks) == 1
    assert result.stats.tpf == length / steps


def test_block_decode_suppresses_special_tokens():
    logits = favouring(torch.full((1, 4), 7), torch.full((1, 4), 9.0))
    logits[..., 3] = 5.0
    forward, _ = scripted([logits] * 4)
    result = block_decode(forward, torch.full((1, 4), MASK), MASK, steps=4, block_length=4,
                          sampling=Sampling(suppress_ids=(7,)))
    assert torch.all(result.tokens == 3)


def test_mask_predict_remasks_the_published_counts_and_revises():
    n, steps = 10, 4
    answers = [torch.randint(2, V, (1, n)) for _ in range(steps)]
    logits = [favouring(a, torch.rand(1, n) + 1) for a in answers]
    forward, seen = scripted(logits)
    result = mask_predict_decode(forward, torch.full((1, n), MASK), MASK, steps=steps, sampling=Sampling())
    assert result.stats.nfe == steps
    masked_at_input = [int((x == MASK).sum()) for x, _ in seen]
    assert masked_at_input == [n] + [n * (steps - 1 - s) // steps for s in range(steps - 1)]
    assert all(bool(score.all()) for _, score in seen)  # the ranking needs every answer position
    assert torch.equal(result.tokens[0][seen[-1][0][0] == MASK], answers[-1][0][seen[-1][0][0] == MASK])


def test_more_steps_than_tokens_is_refused():
    forward, _ = scripted([favouring(torch.full((1, 16), 5), torch.ones(1, 16))] * 32)
    with pytest.raises(PerceptionDLMError, match="steps"):
        mask_predict_decode(forward, torch.full((1, 16), MASK), MASK, steps=32, sampling=Sampling())
    with pytest.raises(PerceptionDLMError, match="exceeds"):
        block_decode(forward, torch.full((1, 16), MASK), MASK, steps=32, block_length=16, sampling=Sampling())


def test_classifier_free_guidance_extrapolates_away_from_the_unconditional():
    cond = favouring(torch.full((1, 4), 3), torch.full((1, 4), 2.0))
    cond[..., 4] = 1.9  # token 4 nearly as likely as 3 ...
    uncond = favouring(torch.full((1, 4), 3), torch.full((1, 4), 2.0))  # ... but 3 is what the prompt-free model says
    forward, _ = scripted([cond] * 4)
    unconditional, calls = scripted([uncond] * 4)
    plain = block_decode(scripted([cond] * 4)[0], torch.full((1, 4), MASK), MASK, steps=4, block_length=4,
                         sampling=Sampling())
    guided = block_decode(forward, torch.full((1, 4), MASK), MASK, steps=4, block_length=4, sampling=Sampling(),
                          cfg_scale=1.0, unconditional=unconditional)
    assert torch.all(plain.tokens == 3) and torch.all(guided.tokens == 4) and len(calls) == 4


def test_golden_region_sampler_replay():
    golden = load_file(str(FIXTURES / "pdmllm" / "golden.safetensors"))
    mask = SpecialTokens.from_tokenizer(FIXTURES / "pdmllm" / "checkpoint").mask
    step_logits = golden["sampler_step_answer_logits"][:, None]  # (8, 1, 24, V)
    forward, seen = scripted(step_logits)
    result = mask_predict_decode(forward, torch.full((1, 24), mask), mask, steps=8, sampling=Sampling(),
                                 keep_history=True)
    for s, (x, _) in enumerate(seen):
        assert torch.equal(x[0], golden["sampler_step_answer_tokens"][s]), f"step {s}"
    assert torch.equal(result.tokens[0], golden["output_slot_tokens"].flatten())
    assert result.stats.nfe == 8 and len(result.history) == 9


def lm_forward(model, sequence: torch.Tensor, answer: torch.Tensor):
    """Forward over the full token sequence with the answer tokens written at `answer` (B, L) positions."""

    def forward(x, score):
        ids = sequence.clone()
        ids[answer] = x.flatten()
        where = torch.zeros_like(answer)
        where[answer] = score.flatten()
        return model(input_ids=ids, logits_mask=where).logits

    return forward


def test_golden_llada_sampler_end_to_end():
    golden = load_file(str(FIXTURES / "llada_hf" / "golden.safetensors"))
    mask = SpecialTokens.from_tokenizer(FIXTURES / "llada_hf").mask
    step_logits = golden["nonblock_step_answer_logits"][:, None]
    forward, _ = scripted(step_logits)
    replay = mask_predict_decode(forward, torch.full((1, 12), mask), mask, steps=6, sampling=Sampling())
    sequence = golden["nonblock_input_ids"]
    answer = sequence == mask
    assert torch.equal(replay.tokens[0], golden["nonblock_output_ids"][answer])
    model = LLaDAModelLM.from_pretrained(FIXTURES / "llada_hf").eval()
    with torch.no_grad():
        result = mask_predict_decode(lm_forward(model, sequence, answer), sequence[answer][None], mask, steps=6,
                                     sampling=Sampling())
    assert torch.equal(result.tokens[0], golden["nonblock_output_ids"][answer]) and result.stats.nfe == 6


def test_threshold_commits_confident_tokens_and_at_least_one_per_slot():
    n = 8
    slots = torch.tensor([[0] * 4 + [1] * 4])
    answer = torch.arange(2, 2 + n)[None]
    margin = torch.tensor([[9.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4]])  # slot 0 has one confident position
    forward, seen = scripted([favouring(answer, margin)] * n)
    result = threshold_decode(forward, torch.full((1, n), MASK), MASK, threshold=0.5, slots=slots,
                              sampling=Sampling(), eot_id=EOT)
    first_commit = seen[1][0][0] != MASK
    assert first_commit.tolist() == [True, False, False, False, False, False, False, True]
    assert torch.equal(result.tokens, answer) and result.stats.nfe == 4
    for x, score in seen:
        assert torch.equal(score, x == MASK)  # only still-masked positions are scored


def test_threshold_above_one_equals_one_token_per_step_block_decoding():
    torch.manual_seed(1)
    logits = [torch.randn(1, 6, V) * 3 for _ in range(6)]
    f1, _ = scripted(logits)
    f2, _ = scripted(logits)
    fast = threshold_decode(f1, torch.full((1, 6), MASK), MASK, threshold=1.5, sampling=Sampling(), eos_stop=False)
    reference = block_decode(f2, torch.full((1, 6), MASK), MASK, steps=6, block_length=6, sampling=Sampling())
    assert torch.equal(fast.tokens, reference.tokens) and fast.stats.nfe == reference.stats.nfe == 6


def test_eos_stop_pads_the_rest_of_the_slot():
    slots = torch.tensor([[0] * 4 + [1] * 4])
    answer = torch.tensor([[5, EOT, 6, 7, 8, 9, 10, 11]])
    margin = torch.tensor([[9.0, 9.0, 0.1, 0.1, 0.1, 0.2, 0.3, 0.4]])
    forward, seen = scripted([favouring(answer, margin)] * 8)
    result = threshold_decode(forward, torch.full((1, 8), MASK), MASK, threshold=0.5, slots=slots,
                              sampling=Sampling(), eot_id=EOT)
    assert result.tokens[0, :4].tolist() == [5, EOT, EOT, EOT]
    assert result.tokens[0, 4:].tolist() == [8, 9, 10, 11]
    assert result.stats.nfe == 4 and result.stats.tokens == 8 and result.stats.content_tokens == 5
    assert not seen[1][1][0, :4].any()  # the finished slot is no longer scored


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, None, float(probs[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False, False]]
    torch.manual_seed(0)
    draws = {int(Sampling(temperature=1.0, top_k=2).draw(logits)[0]) for _ in range(200)}
    assert draws == {0, 1}


def test_bad_sampler_arguments_raise_clear_errors():
    forward, _ = scripted([favouring(torch.full((1, 8), 3), torch.ones(1, 8))] * 8)
    x = torch.full((1, 8), MASK)
    with pytest.raises(PerceptionDLMError, match="divisible by block_length"):
        block_decode(forward, x, MASK, steps=8, block_length=3, sampling=Sampling())
    with pytest.raises(PerceptionDLMError, match="divisible by the number of blocks"):
        block_decode(forward, x, MASK, steps=3, block_length=4, sampling=Sampling())
    with pytest.raises(PerceptionDLMError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(PerceptionDLMError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(PerceptionDLMError, match="no masked"):
        threshold_decode(forward, torch.full((1, 8), 3), MASK, threshold=0.9, sampling=Sampling())
