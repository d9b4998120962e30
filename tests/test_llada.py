"""The LLaDA backbone: golden parity with the reference, parity with transformers' Llama, masks, loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, tiny_llada, tiny_llada_config
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from perceptiondlm import PerceptionDLMError
from perceptiondlm.models.llada import LLaDAModelLM

GOLDEN_DIR = FIXTURES / "llada_hf"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_golden_logits_and_hidden_states(golden, backend):
    model = LLaDAModelLM.from_pretrained(GOLDEN_DIR, attn_implementation=backend).eval()
    with torch.no_grad():
        out = model(input_ids=golden["input_ids"], output_hidden_states=True)
    torch.testing.assert_close(out.logits, golden["logits"], atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(out.hidden_states, golden["hidden_states"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_golden_padded_logits(golden, backend):
    model = LLaDAModelLM.from_pretrained(GOLDEN_DIR, attn_implementation=backend).eval()
    mask = golden["padded_attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=golden["padded_input_ids"], attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], golden["padded_logits"][keep], atol=1e-4, rtol=1e-4)


def llama_twin(model: LLaDAModelLM) -> LlamaForCausalLM:
    """transformers' own Llama with the same weights (the key names are the same by design)."""
    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings,
    )
    config._attn_implementation = "eager"
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_transformers_llama_with_full_mask(kv_heads):
    model = tiny_llada("eager", num_key_value_heads=kv_heads)
    llama = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    full = torch.ones(2, 1, 17, 17, dtype=torch.bool)  # a 4-D mask turns Llama's causal masking off
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = llama(input_ids=ids, attention_mask=full).logits
        causal = llama(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, causal, atol=1e-3)  # the comparison can tell the two apart


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_left_and_right_padding_give_the_same_logits(backend):
    model = tiny_llada(backend)
    real, pad = torch.randint(0, 90, (11,)), 5
    right = torch.cat([real, torch.full((pad,), 95)])[None]
    left = torch.cat([torch.full((pad,), 95), real])[None]
    right_mask = torch.cat([torch.ones(11), torch.zeros(pad)]).long()[None]
    left_mask = right_mask.flip(-1)
    with torch.no_grad():
        alone = model(input_ids=real[None]).logits[0]
        r = model(input_ids=right, attention_mask=right_mask).logits[0, :11]
        a = model(input_ids=left, attention_mask=left_mask).logits[0, pad:]
    torch.testing.assert_close(r, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=1e-5)


def region_like_mask(length: int) -> torch.Tensor:
    """A 4-D boolean layout with blocked pairs: two 'slots' that cannot see each other."""
    allowed = torch.ones(length, length, dtype=torch.bool)
    allowed[8:12, 12:16] = False
    allowed[12:16, 8:12] = False
    return allowed[None, None]


def test_sdpa_and_eager_agree_for_every_mask_kind():
    sdpa, eager = tiny_llada("sdpa"), tiny_llada("eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 90, (2, 16))
    allowed = region_like_mask(16)
    additive = torch.zeros(1, 1, 16, 16).masked_fill(~allowed, torch.finfo(torch.float32).min)
    masks = [None, torch.tensor([[1] * 16, [1] * 12 + [0] * 4]), allowed, allowed.long(), additive]
    with torch.no_grad():
        for mask in masks:
            torch.testing.assert_close(
                sdpa(input_ids=ids, attention_mask=mask).logits,
                eager(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5,
            )


def test_a_4d_mask_really_isolates_blocks():
    model = tiny_llada("sdpa")
    ids = torch.randint(0, 90, (1, 16))
    changed = ids.clone()
    changed[0, 12:16] = (ids[0, 12:16] + 1) % 90  # edit the other slot
    # Block slot 12:16 from everything slot 8:12 can reach (itself and the prefix); otherwise a two-layer
    # model leaks the edit through the prefix, which sees both slots.
    mask = region_like_mask(16)
    mask[0, 0, :8, 12:16] = False
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits[0, 8:12]
        after = model(input_ids=changed, attention_mask=mask).logits[0, 8:12]
        unmasked = model(input_ids=changed).logits[0, 8:12]
    torch.testing.assert_close(before, after)
    assert not torch.allclose(before, unmasked, atol=1e-4)


def test_logits_mask_scores_only_the_requested_positions():
    model = tiny_llada()
    ids = torch.randint(0, 90, (2, 10))
    where = torch.rand(2, 10) < 0.4
    with torch.no_grad():
        full = model(input_ids=ids).logits
        some = model(input_ids=ids, logits_mask=where).logits
    assert some.shape == (int(where.sum()), model.config.vocab_size)
    torch.testing.assert_close(some, full[where])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_llada().train()
    ids = torch.randint(0, 90, (2, 12))

    def grads():
        model.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_rope_linear_scaling_divides_positions():
    plain = tiny_llada()
    scaled = tiny_llada(rope_scaling={"type": "linear", "factor": 2.0})
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 90, (1, 8))
    with torch.no_grad():
        a = scaled(input_ids=ids, position_ids=torch.arange(0, 16, 2)[None]).logits
        b = plain(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def test_sharded_and_single_file_checkpoints_load_the_same(tmp_path):
    model = tiny_llada()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 90, (1, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for name in ("single", "sharded"):
            loaded = LLaDAModelLM.from_pretrained(tmp_path / name).eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_dtype_is_honoured(tmp_path):
    tiny_llada().save_pretrained(tmp_path)
    model = LLaDAModelLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_are_named(tmp_path):
    shutil.copytree(GOLDEN_DIR, tmp_path / "ckpt")
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(PerceptionDLMError) as err:
        LLaDAModelLM.from_pretrained(tmp_path / "ckpt")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.1.mlp.extra.weight" in str(err.value)


def test_bad_directories_and_configs_raise_clear_errors(tmp_path):
    with pytest.raises(PerceptionDLMError, match="not found"):
        LLaDAModelLM.from_pretrained(tmp_path / "nowhere")
    shutil.copy(GOLDEN_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(PerceptionDLMError, match="No weights"):
        LLaDAModelLM.from_pretrained(tmp_path)
    shutil.copy(GOLDEN_DIR / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((GOLDEN_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "pdmllm"}))
    with pytest.raises(PerceptionDLMError, match="'pdmllm' config"):
        LLaDAModelLM.from_pretrained(tmp_path)


def test_bad_masks_and_configs_raise_clear_errors():
    model = tiny_llada()
    ids = torch.randint(0, 90, (2, 6))
    for mask in (torch.ones(2, 5), torch.ones(6), torch.ones(2, 1, 6, 5), torch.ones(3, 1, 6, 6)):
        with pytest.raises(PerceptionDLMError, match="attention mask"):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(PerceptionDLMError, match="multiple of"):
        tiny_llada_config(hidden_size=30)
    with pytest.raises(PerceptionDLMError, match="rope_scaling"):
        tiny_llada_config(rope_scaling={"type": "yarn", "factor": 2.0})
