"""Diffusion samplers (spec §4): pure functions over a forward callable, serving both models.

A sampler only sees the *answer* tokens x (B, N) — the positions that start as `<|mdm_mask|>` — and a
`forward(x, score) -> logits` callable that returns the logits at the answer positions where `score` (B, N)
is True, in row-major order, shape (n_scored, V). The model side closes over the image features, the region
layout and any cache. Three decoders:

- `block_decode`: LLaDA's semi-autoregressive sampler (Nie et al., arXiv:2502.09992, Alg. 5 / §2.4), used by
  PerceptionDLM-Base: blocks left to right, a fixed number of tokens per step (linear schedule), low-confidence
  or random remasking.
- `mask_predict_decode`: the reference's parallel-region sampler (Mask-Predict, Ghazvininejad et al., 2019):
  every step predicts all answers, then re-masks the globally least confident ⌊N(S−1−s)/S⌋; committed tokens
  may be revised.
- `threshold_decode`: the fast sampler: commit every masked position whose confidence exceeds τ (at least one per
  slot and step; Fast-dLLM, Wu et al., arXiv:2505.22618), score only still-masked positions, and finish a slot
  once it has produced `<|eot_id|>`.

The first two reproduce the reference token for token at temperature 0 (fp64 confidences, as the reference).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from perceptiondlm.errors import PerceptionDLMError

ForwardFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor], None]


@dataclass
class SamplerStats:
    """Counts of one decoding call. `tokens` = answer positions resolved (K·g per sequence, eot padding
    included, as the paper's TPF = K·g / NFE); `content_tokens` = tokens before each slot's first eot."""

    nfe: int = 0
    tokens: int = 0
    content_tokens: int = 0
    seconds_vision: float = 0.0
    seconds_prefill: float = 0.0
    seconds_denoise: float = 0.0

    @property
    def tpf(self) -> float:
        """Tokens per forward pass."""
        return self.tokens / max(self.nfe, 1)

    @property
    def seconds(self) -> float:
        return self.seconds_vision + self.seconds_prefill + self.seconds_denoise

    def merge(self, other: SamplerStats) -> SamplerStats:
        return SamplerStats(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


@dataclass
class SamplerResult:
    tokens: Tensor  # (B, N) final answer tokens
    stats: SamplerStats
    history: list[Tensor] | None = field(default=None, repr=False)  # token states, one per step (+ initial)


# --- small named pieces ----------------------------------------------------------------------------------


def transfer_schedule(masked_count: Tensor, steps: int) -> Tensor:
    """Tokens to commit at each step: k_s = ⌊M/S⌋ + [s < M mod S] (LLaDA's linear schedule, paper Eq. 8
    and §B.3): the masked count falls linearly. (B,) -> (B, S) long."""
    base = masked_count[:, None] // steps
    extra = torch.arange(steps, device=masked_count.device)[None] < (masked_count % steps)[:, None]
    return base + extra.long()


def add_gumbel_noise(logits: Tensor, temperature: float) -> Tensor:
    """Gumbel-max in float64 (low precision Gumbel noise hurts masked diffusion, Zheng et al., arXiv:2409.02908):
    argmax of exp(l) / (−log u)^τ samples softmax(l / τ). Temperature 0 returns the logits unchanged."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits)
    return logits.exp() / (-torch.log(noise)) ** temperature


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the top-k logits and the smallest nucleus holding top_p of the probability; the rest -> -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def low_confidence(logits: Tensor, chosen: Tensor, precision: torch.dtype) -> Tensor:
    """Softmax probability of the chosen token (untempered)."""
    return logits.to(precision).softmax(-1).gather(-1, chosen[..., None]).squeeze(-1)


def random_confidence(logits: Tensor, chosen: Tensor, precision: torch.dtype) -> Tensor:
    """Uniform random scores: remask at random."""
    return torch.rand(chosen.shape, dtype=precision, device=chosen.device)


REMASKING: dict[str, Callable[[Tensor, Tensor, torch.dtype], Tensor]] = {
    "low_confidence": low_confidence,
    "random": random_confidence,
}


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn from logits. temperature 0 = greedy; top_k / top_p restrict the draw."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    remasking: str = "low_confidence"
    suppress_ids: tuple[int, ...] = ()  # never written into an answer (spec §4.1)
    confidence_dtype: torch.dtype = torch.float64  # the reference computes confidences in fp64

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise PerceptionDLMError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PerceptionDLMError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise PerceptionDLMError(f"top_k must be >= 1, got {self.top_k}.")
        if self.remasking not in REMASKING:
            raise PerceptionDLMError(f"remasking must be one of {sorted(REMASKING)}, got {self.remasking!r}.")

    def draw(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(n, V) fp32 logits -> chosen tokens (n,) and their confidences (n,)."""
        if self.suppress_ids:
            logits = logits.clone()
            logits[:, list(self.suppress_ids)] = float("-inf")
        candidates = filter_logits(logits, self.top_k, self.top_p) if self.temperature > 0 else logits
        chosen = add_gumbel_noise(candidates, self.temperature).argmax(-1)
        return chosen, REMASKING[self.remasking](logits, chosen, self.confidence_dtype)


def _scatter(values: Tensor, where: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
    out = torch.full(where.shape, fill, dtype=dtype, device=where.device)
    out[where] = values.to(dtype)
    return out


class _Loop:
    """Bookkeeping shared by the decoders: NFE, history, callback, timing."""

    def __init__(self, forward: ForwardFn, x: Tensor, on_step: StepCallback | None, keep_history: bool) -> None:
        self.forward, self.on_step = forward, on_step
        self.history = [x.clone()] if keep_history else None
        self.stats = SamplerStats()
        self.start = time.perf_counter()

    def logits(self, x: Tensor, score: Tensor) -> Tensor:
        self.stats.nfe += 1
        return self.forward(x, score).float()

    def step_done(self, step: int, x: Tensor) -> None:
        if self.history is not None:
            self.history.append(x.clone())
        if self.on_step is not None:
            self.on_step(step, x)

    def finish(self, x: Tensor, valid: Tensor, eot_id: int | None, slots: Tensor | None = None) -> SamplerResult:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.stats.seconds_denoise = time.perf_counter() - self.start
        self.stats.tokens = int(valid.sum())
        self.stats.content_tokens = int(content_mask(x, valid, eot_id, slots).sum())
        return SamplerResult(tokens=x, stats=self.stats, history=self.history)


def content_mask(x: Tensor, valid: Tensor, eot_id: int | None, slots: Tensor | None = None) -> Tensor:
    """Positions before the first eot of their slot (all valid positions if no eot id is given)."""
    if eot_id is None:
        return valid
    slots = torch.zeros_like(x) if slots is None else slots
    seen = _after_first(x == eot_id, slots) | (x == eot_id)
    return valid & ~seen


def _after_first(flag: Tensor, slots: Tensor) -> Tensor:
    """True at positions after the first flagged position of the same slot (slots contiguous in x)."""
    positions = torch.arange(flag.shape[1], device=flag.device).expand_as(flag)
    key = slots + (slots.max() + 1) * torch.arange(flag.shape[0], device=flag.device)[:, None]  # (B, N)
    first = torch.full((int(key.max()) + 1,), flag.shape[1], device=flag.device, dtype=torch.long)
    first = first.scatter_reduce(0, key[flag], positions[flag], "amin")
    return positions > first[key]


# --- decoders ------------------------------------------------------------------------------------------


def block_decode(
    forward: ForwardFn,
    x: Tensor,
    mask_id: int,
    *,
    steps: int,
    block_length: int,
    sampling: Sampling,
    eot_id: int | None = None,
    cfg_scale: float = 0.0,
    unconditional: ForwardFn | None = None,
    on_step: StepCallback | None = None,
    keep_history: bool = False,
) -> SamplerResult:
    """LLaDA semi-autoregressive decoding of the answer x (B, N), all `mask_id` at the start.

    Args:
        steps: total denoising steps, split evenly over the N / block_length blocks (both must divide).
        block_length: tokens per block; block b is decoded in steps/num_blocks steps, k_s tokens per step
            (`transfer_schedule`), choosing the most confident masked positions of the block.
        cfg_scale: classifier-free guidance w (paper §B.3): logits = u + (w + 1)(c − u), with u from
            `unconditional`, the same forward with the prompt masked out. One extra forward per step.

    Only still-masked positions of the current block are scored: the others cannot be chosen, so this
    changes no result. Exact reference behaviour at temperature 0 (spec §4.1).
    """
    length = x.shape[1]
    if steps > length:
        raise PerceptionDLMError(f"steps {steps} exceeds the {length} tokens to generate; use steps <= gen_length.")
    if cfg_scale > 0 and unconditional is None:
        raise PerceptionDLMError("cfg_scale > 0 needs an unconditional forward.")
    if block_length < 1 or length % block_length:
        raise PerceptionDLMError(f"gen_length {length} is not divisible by block_length {block_length}.")
    num_blocks = length // block_length
    if steps < 1 or steps % num_blocks:
        raise PerceptionDLMError(f"steps {steps} is not divisible by the number of blocks {num_blocks}.")
    steps_per_block = steps // num_blocks
    loop, x = _Loop(forward, x, on_step, keep_history), x.clone()
    step = 0
    for block in range(num_blocks):
        in_block = torch.zeros_like(x, dtype=torch.bool)
        in_block[:, block * block_length : (block + 1) * block_length] = True
        schedule = transfer_schedule((x[:, in_block[0]] == mask_id).sum(-1), steps_per_block)  # (B, S)
        for s in range(steps_per_block):
            masked = (x == mask_id) & in_block
            if not masked.any():
                break
            logits = loop.logits(x, masked)
            if cfg_scale > 0:
                uncond = unconditional(x, masked).float()
                logits = uncond + (cfg_scale + 1) * (logits - uncond)
            chosen, confidence = sampling.draw(logits)
            confidence = _scatter(confidence, masked, float("-inf"), torch.float64)  # (B, N)
            commit = _top_per_row(confidence, schedule[:, s])
            x[commit] = _scatter(chosen, masked, mask_id, x.dtype)[commit]
            loop.step_done(step, x)
            step += 1
    return loop.finish(x, torch.ones_like(x, dtype=torch.bool), eot_id)


def _top_per_row(scores: Tensor, counts: Tensor) -> Tensor:
    """Boolean (B, N): the counts[b] highest scores of each row (stable order on ties)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks < counts[:, None]


def mask_predict_decode(
    forward: ForwardFn,
    x: Tensor,
    mask_id: int,
    *,
    steps: int,
    sampling: Sampling,
    valid: Tensor | None = None,
    slots: Tensor | None = None,
    eot_id: int | None = None,
    on_step: StepCallback | None = None,
    keep_history: bool = False,
) -> SamplerResult:
    """The reference's parallel-region sampler (spec §4.2) over all answer slots at once.

    Each step scores every answer position (the ranking needs all of them), writes the prediction at the
    masked ones, then re-masks the r = ⌊N·(S−1−s)/S⌋ least confident positions of the whole answer, where
    confidence refers to the new prediction even where the kept token differs. `valid` (B, N) marks real
    answer positions in a batch whose rows have different answer counts; `slots` only feeds the statistics.
    """
    valid = torch.ones_like(x, dtype=torch.bool) if valid is None else valid
    counts = valid.sum(-1)  # (B,) answer tokens N per row
    if not valid.any():
        raise PerceptionDLMError("There is no masked answer position to decode.")
    if not 1 <= steps <= int(counts.min()):
        raise PerceptionDLMError(f"steps must be in 1..{int(counts.min())} (the answer tokens), got {steps}.")
    loop, x = _Loop(forward, x, on_step, keep_history), x.clone()
    masked = valid & (x == mask_id)
    for s in range(steps):
        if not masked.any():
            break
        chosen, confidence = sampling.draw(loop.logits(x, valid))
        chosen = _scatter(chosen, valid, mask_id, x.dtype)
        x = torch.where(masked, chosen, x)
        remask = counts * (steps - 1 - s) // steps  # (B,)
        if s == steps - 1 or not remask.any():
            loop.step_done(s, x)
            break
        confidence = _scatter(confidence, valid, float("inf"), torch.float64)
        masked = _top_per_row(-confidence, remask)
        x = torch.where(masked, torch.full_like(x, mask_id), x)
        loop.step_done(s, x)  # the state the next step starts from
    return loop.finish(x, valid, eot_id, slots)


def threshold_decode(
    forward: ForwardFn,
    x: Tensor,
    mask_id: int,
    *,
    threshold: float,
    sampling: Sampling,
    slots: Tensor | None = None,
    valid: Tensor | None = None,
    eot_id: int | None = None,
    eos_stop: bool = True,
    on_step: StepCallback | None = None,
    keep_history: bool = False,
) -> SamplerResult:
    """Confidence-threshold parallel decoding.

    Each step scores only still-masked positions and commits those with confidence > `threshold`, and in
    every unfinished slot at least its most confident one, so it terminates in at most g steps. Committed
    tokens are final. With `eos_stop`, once a slot holds `eot_id` its later masked positions become eot
    without being decoded. `slots` (B, N) gives each answer position's slot (contiguous runs); default one
    slot per row.
    """
    if threshold <= 0:
        raise PerceptionDLMError(f"threshold must be > 0, got {threshold}.")
    valid = torch.ones_like(x, dtype=torch.bool) if valid is None else valid
    slots = torch.zeros_like(x) if slots is None else slots
    if not (valid & (x == mask_id)).any():
        raise PerceptionDLMError("There is no masked answer position to decode.")
    key = slots + (int(slots.max()) + 1) * torch.arange(x.shape[0], device=x.device)[:, None]  # (B, N) slot key
    loop, x = _Loop(forward, x, on_step, keep_history), x.clone()
    step = 0
    while (masked := valid & (x == mask_id)).any():
        chosen, confidence = sampling.draw(loop.logits(x, masked))
        confidence = _scatter(confidence, masked, float("-inf"), torch.float64)  # (B, N)
        best = torch.full((int(key.max()) + 1,), float("-inf"), dtype=torch.float64, device=x.device)
        best = best.scatter_reduce(0, key[masked], confidence[masked], "amax")
        commit = masked & ((confidence > threshold) | (confidence == best[key]))
        x[commit] = _scatter(chosen, masked, mask_id, x.dtype)[commit]
        if eos_stop and eot_id is not None:
            finished = _after_first(x == eot_id, slots) & (x == mask_id)
            x[finished] = eot_id
        loop.step_done(step, x)
        step += 1
    return loop.finish(x, valid, eot_id, slots)
