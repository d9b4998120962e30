"""Model configurations. Field names are the keys of the released `config.json` files, unchanged.

`LLaDAConfig` reads the `MSALab/LLaDA-8B-Instruct-HF` layout (model_type "llada", Llama field names);
spec §1.1 lists the real LLaDA-8B values, which are the defaults here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

from perceptiondlm.errors import PerceptionDLMError

ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2")
ROPE_SCALING_TYPES = ("linear", "dynamic")


class LLaDAConfig(PretrainedConfig):
    """LLaDA-8B backbone: a Llama-shaped transformer with bidirectional attention (spec §1)."""

    model_type: ClassVar[str] = "llada"

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    # None means plain multi-head attention (LLaDA-8B); fewer heads than queries gives GQA.
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    # RoPE is computed on the fly, so this is no hard limit; "dynamic" RoPE scaling starts past it.
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, {"type"|"rope_type": "linear", "factor": f} or {"type"|"rope_type": "dynamic", "factor": f}.
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    # LLaDA has no KV cache across calls; kept so that released configs round-trip.
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Released configs point `auto_map` at remote code that is not shipped; our classes are registered
        # with the Auto classes instead, so the pointer is dropped rather than carried into saved copies.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        self.check()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        """Every consistency check in one place; raises `PerceptionDLMError` naming the field to fix."""
        if self.hidden_size % self.num_attention_heads:
            raise PerceptionDLMError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2:
            raise PerceptionDLMError(f"RoPE needs an even head dimension, got {self.head_dim}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PerceptionDLMError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.hidden_act != "silu":
            raise PerceptionDLMError(f"LLaDA uses a SwiGLU MLP (hidden_act 'silu'), got {self.hidden_act!r}.")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALING_TYPES or float(self.rope_scaling.get("factor", 0)) < 1.0:
                raise PerceptionDLMError(
                    f"rope_scaling must be None or have type in {ROPE_SCALING_TYPES} and factor >= 1, "
                    f"got {self.rope_scaling}."
                )
