"""The LLaDA-8B backbone (spec §1): a Llama-shaped pre-norm transformer with *bidirectional* attention.

Reading order follows `modeling_llama`: RMSNorm, rotary embedding, MLP, attention kernels (one function per
backend, chosen by name), attention, decoder layer, `LLaDAModel` (hidden states) and `LLaDAModelLM`
(embedding + body + untied `lm_head`). Attribute names make the state-dict keys equal the released ones
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so loading needs no renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.loading import verify_checkpoint


class LLaDARMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply (spec §1.2)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    config: LLaDAConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the half-split ("rotate_half") RoPE, computed in fp32 from the positions: (B, L, head_dim)."""
    dim, base = config.head_dim, float(config.rope_theta)
    positions = position_ids.float()
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        positions = positions / float(scaling["factor"])
    elif kind == "dynamic":
        # Dynamic NTK: enlarge the base once the sequence outgrows the trained context.
        seq_len = int(position_ids.max()) + 1
        if seq_len > config.max_position_embeddings:
            factor = float(scaling["factor"])
            ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
            base = base * ratio ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).float() / dim
    inv_freq = 1.0 / (base**exponents)  # (dim/2,)
    freqs = positions[..., None] * inv_freq  # (B, L, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, L, D); cos/sin (B, L, D) broadcast over heads.
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class LLaDAMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- attention kernels -------------------------------------------------------------------------------
# One signature for every backend: q (B, H, L, D), k/v (B, Hkv, L, D), an optional mask, the softmax scale
# and the dropout probability; they return (B, L, H, D). For eager/sdpa the mask is boolean (True = may
# attend) or additive float, broadcastable to (B, H, Lq, Lk); for flash it is a 2-D key-padding mask (B, L).


def eager_attention(q, k, v, mask, scale: float, dropout: float) -> torch.Tensor:
    """The readable reference: explicit scores, fp32 softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v).transpose(1, 2)


def sdpa_attention(q, k, v, mask, scale: float, dropout: float) -> torch.Tensor:
    """torch's fused scaled-dot-product attention, non-causal."""
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=False, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2)


def flash_attention(q, k, v, mask, scale: float, dropout: float) -> torch.Tensor:
    """flash-attn 2, non-causal; a 2-D padding mask runs the varlen kernel on the unpadded tokens."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D)
    if mask is None:
        return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scale, causal=False)
    batch, length = mask.shape
    keep = mask.reshape(-1).nonzero().squeeze(-1)  # indices of real tokens in the flattened batch
    lengths = mask.sum(-1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    flat = [t.reshape(batch * length, *t.shape[2:])[keep] for t in (q, k, v)]
    out = flash_attn_varlen_func(
        *flat, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=False
    )
    padded = out.new_zeros(batch * length, *out.shape[1:])
    padded[keep] = out
    return padded.view(batch, length, *out.shape[1:])


ATTENTION_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention,
}


def attention_function(backend: str | None) -> Callable[..., torch.Tensor]:
    try:
        return ATTENTION_FUNCTIONS[backend or "sdpa"]
    except KeyError:
        raise PerceptionDLMError(
            f"LLaDA has no attention backend {backend!r}; choose one of {sorted(ATTENTION_FUNCTIONS)}."
        ) from None


KeyValues = tuple[torch.Tensor, torch.Tensor] | None  # one layer's (keys, values), each (B, Hkv, P, D)


@dataclass
class LLaDAOutput(ModelOutput):
    """`logits` (B, L, V) or (N, V) for a `logits_mask`; `key_values` per layer when asked for."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class LLaDAAttention(nn.Module):
    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, past: KeyValues = None):
        """Returns the output and this call's (k, v); `past` keys/values of earlier positions are attended to
        before the current ones (the prefix cache of `perceptiondlm.diffusion.cache`)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        current = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, P + L, D)
        attend = attention_function(self.config._attn_implementation)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q, k, v, mask, self.scale, dropout)  # (B, L, H, D)
        return self.o_proj(out.reshape(batch, length, -1)), current


class LLaDADecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: two residual lines."""

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LLaDAAttention(config, layer_idx)
        self.mlp = LLaDAMLP(config)
        self.input_layernorm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None, past: KeyValues = None):
        attended, current = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), current


def prepare_attention_mask(
    mask: torch.Tensor | None, batch: int, length: int, num_heads: int, backend: str, past_length: int = 0
) -> torch.Tensor | None:
    """Checks a user's attention mask and turns it into what the backend's kernel takes.

    Accepted: None (every token sees every token); a 2-D key-padding mask (B, L), 1/True = real token; a
    4-D mask broadcastable to (B, H, L, L) that is boolean (True = may attend), integer (1 = may attend) or
    additive float (0 = may attend, a large negative value = blocked, as the reference's region mask).
    With `past_length` cached positions before the current ones, a 2-D mask covers all past + current keys
    and a 4-D mask has shape (B, H, length, past_length + length).
    """
    keys = past_length + length
    if mask is None:
        return None
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, keys):
            raise PerceptionDLMError(
                f"A 2-D attention mask must have shape (batch, length) = ({batch}, {keys}), "
                f"got {tuple(mask.shape)}."
            )
        keep = mask.bool()
        if bool(keep.all()):
            return None
        if backend == "flash_attention_2" and past_length:
            raise PerceptionDLMError("flash_attention_2 takes no padding mask together with cached keys.")
        return keep if backend == "flash_attention_2" else keep[:, None, None, :]  # (B, 1, 1, L)
    if mask.dim() == 4:
        b, h, lq, lk = mask.shape
        if b not in (1, batch) or h not in (1, num_heads) or (lq, lk) != (length, keys):
            raise PerceptionDLMError(
                f"A 4-D attention mask must be broadcastable to (batch, heads, length, length) = "
                f"({batch}, {num_heads}, {length}, {keys}), got {tuple(mask.shape)}."
            )
        if backend == "flash_attention_2":
            raise PerceptionDLMError(
                "flash_attention_2 cannot apply a 4-D attention mask; load the model with "
                "attn_implementation='sdpa' (or 'eager') for region masks."
            )
        return mask if mask.dtype == torch.bool or mask.is_floating_point() else mask.bool()
    raise PerceptionDLMError(
        f"The attention mask must be 2-D (batch, length) or 4-D (batch, heads, length, length), "
        f"got a {mask.dim()}-D tensor of shape {tuple(mask.shape)}."
    )


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    config: LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDADecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # Kernels are looked up by name at every call (`attention_function`), so `set_attn_implementation` may
    # switch backends on a loaded model; transformers' source heuristic cannot see that, so say it here.
    _can_set_attn_implementation_cached_value = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs):
        """Loads a local checkpoint (single-file or sharded safetensors) strictly.

        Before any tensor is read, the directory, the config's `model_type` and the checkpoint's key set
        are checked; a missing or unexpected key is an error naming the keys, never a silent random init.
        Weights are materialised in the requested `dtype` (`torch_dtype` is accepted too) straight from
        the files, without a full fp32 copy first.
        """
        directory = Path(pretrained_model_name_or_path)
        config = verify_checkpoint(directory, cls, kwargs.get("config"))
        kwargs.setdefault("config", config)
        if "torch_dtype" in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return super().from_pretrained(directory, *args, **kwargs)


class LLaDAModel(LLaDAPreTrainedModel):
    """Embedding, decoder layers and the final norm; returns hidden states."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        return_key_values: bool = False,
    ) -> LLaDAOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise PerceptionDLMError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        batch, length, _ = x.shape
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            # Plain 0..L-1 for every row, as the reference (padding does not shift positions; RoPE is
            # relative, so left padding still gives the same logits at real tokens).
            position_ids = torch.arange(past_length, past_length + length, device=x.device).expand(batch, length)
        cos, sin = rotary_cos_sin(self.config, position_ids, x.dtype)
        backend = self.config._attn_implementation or "sdpa"
        mask = prepare_attention_mask(
            attention_mask, batch, length, self.config.num_attention_heads, backend, past_length
        )
        hidden_states = [x] if output_hidden_states else None
        key_values = [] if return_key_values else None
        for i, layer in enumerate(self.layers):
            x, current = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            if hidden_states is not None:
                hidden_states.append(x)
            if key_values is not None:
                key_values.append(current)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states[-1] = x  # the last entry is after the final norm, as in transformers
        return LLaDAOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states else None,
            key_values=key_values,
        )


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its untied `lm_head`. A forward never adds noise: it returns clean logits."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        return_key_values: bool = False,
    ) -> LLaDAOutput:
        """Clean logits (B, L, V), or only where `logits_mask` (B, L) is True: (N, V) in row-major order.

        Scoring only the positions a caller needs (the still-masked ones while sampling, the noised ones
        while training) skips most of the `lm_head` work, which dominates at a 126k vocabulary.
        `past_key_values` (per layer, from an earlier call with `return_key_values`) stand for positions
        before `input_ids`; see `perceptiondlm.diffusion.cache`.
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            past_key_values=past_key_values,
            return_key_values=return_key_values,
        )
        hidden = out.last_hidden_state  # (B, L, D)
        if logits_mask is not None:
            if logits_mask.shape != hidden.shape[:2]:
                raise PerceptionDLMError(
                    f"logits_mask must have shape (batch, length) = {tuple(hidden.shape[:2])}, "
                    f"got {tuple(logits_mask.shape)}."
                )
            hidden = hidden[logits_mask.bool()]  # (N, D)
        return LLaDAOutput(logits=self.lm_head(hidden), hidden_states=out.hidden_states, key_values=out.key_values)


AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
