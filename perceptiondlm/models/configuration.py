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


ROI_INFERENCE_SCALE = 1 / 32  # spec §3.4: the reference's generation path scales boxes by 1/32 twice
ROI_TRAINING_SCALE = 1 / 28  # ... and its training forward by 1/28
MASK_ACTIVITY_MODES = ("compat", "coverage")


class PerceptionDLMConfig(PretrainedConfig):
    """PerceptionDLM, the parallel region captioner (model_type "pdmllm"); see `PerceptionDLMBaseConfig`
    for the image-level Base model. Keys are those of the released `config.json`.

    The four `compat`-style flags reproduce behaviours the released weights were trained with (spec §3.4,
    §3.6). Their defaults are the released behaviour, so a released `config.json` (which lacks them) loads
    faithfully; models trained here write the corrected values explicitly.
    """

    model_type: ClassVar[str] = "pdmllm"

    # The LLaDA backbone's config (an `LLaDAConfig` dict) and the full SigLIP(2) config of the vision tower.
    language_model_config: dict | None = None
    vision_model_config: dict | None = None
    # {"projection_type": "mlp2x_gelu"}: Linear -> GELU -> Linear from the pixel-shuffled ViT width to the LM's.
    vision_abstractor_config: dict | None = None
    image_token_id: int | None = None  # id of <IMG_CONTEXT>; must agree with the tokenizer
    image_size: int = 512  # tile side in pixels
    patch_size: int = 16
    downsample_ratio: float = 0.5  # pixel shuffle: 2x2 patches -> one token
    vision_select_layer: int = -2  # ViT features: output of the second-to-last layer, before post-layernorm
    # Region parts: number of mask-id embeddings (= most regions per sequence) and the RoI token grid side.
    # The Base model has prompt_numbers None: no mask embedding, no RoI tokens.
    prompt_numbers: int | None = 6
    roi_output_size: int | None = 4
    replacement_noise_mode: bool = False  # a reference training variant that is not supported here

    # -- behaviour flags (spec §3.4 / §3.6) --
    # RoI merge of the tile features: the reference takes tiles[1:] as if the thumbnail came first, although it
    # comes last, so crop 0 is dropped and the thumbnail fills the last cell. False = crops in their places.
    roi_skips_first_tile: bool = True
    # RoI boxes: the reference maps boxes to feature units and then scales them again inside roi_align
    # (1/32 at inference, 1/28 in training). False = boxes in feature units, spatial scale 1.
    roi_double_scaling: bool = True
    # Which patches a region marks in the ViT: "compat" = the reference's bicubic visual prompt, != 255,
    # nearest sample at pixel (16r, 16c); "coverage" = patches at least half covered by the mask.
    mask_activity: str = "compat"
    # Released models: prompt positions attend to the answer slots (so the prompt's keys change while
    # decoding). False = the prompt never sees the answers, which makes a prefix KV cache exact.
    prefix_attends_answers: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        self.check()

    @property
    def image_tokens_per_tile(self) -> int:
        """(image_size / patch_size)^2 * downsample_ratio^2: 256 for 512-px tiles, 16-px patches, ratio 0.5."""
        return round((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def has_regions(self) -> bool:
        return bool(self.prompt_numbers)

    def check(self) -> None:
        """Every consistency check in one place; raises `PerceptionDLMError` naming the field to fix."""
        if self.language_model_config is None or self.vision_model_config is None:
            raise PerceptionDLMError(
                f"A {self.model_type} config needs language_model_config and vision_model_config."
            )
        if self.image_size % self.patch_size:
            raise PerceptionDLMError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        if self.mask_activity not in MASK_ACTIVITY_MODES:
            raise PerceptionDLMError(f"mask_activity must be one of {MASK_ACTIVITY_MODES}, got {self.mask_activity!r}.")
        if self.replacement_noise_mode:
            raise PerceptionDLMError("replacement_noise_mode is a reference training variant that is not supported.")
        if self.has_regions and not self.roi_output_size:
            raise PerceptionDLMError("A region model needs roi_output_size (the RoI token grid side, e.g. 4).")


class PerceptionDLMBaseConfig(PerceptionDLMConfig):
    """PerceptionDLM-Base, the image-level model (model_type "dmllm"): the same parts minus the region ones."""

    model_type: ClassVar[str] = "dmllm"

    prompt_numbers: int | None = None
    roi_output_size: int | None = None
