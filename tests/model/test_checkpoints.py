"""Every LLaMA-family checkpoint variant loads exactly: logits equal transformers' LlamaForCausalLM."""

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

import knnmem

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)

VARIANTS = {
    "plain": {},
    "gqa 4->2": dict(num_key_value_heads=2),
    "mqa 4->1": dict(num_key_value_heads=1),
    "explicit head_dim": dict(head_dim=16),
    "tied embeddings": dict(tie_word_embeddings=True),
    "attention bias": dict(attention_bias=True),
    "mlp bias": dict(mlp_bias=True),
    "theta 500k": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 16}),
}


def llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else 0.3 * torch.randn_like(param))
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(1, 96, (2, 40))


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_checkpoint_loads_exactly(tmp_path, ids, variant):
    reference = llama(**VARIANTS[variant])
    reference.save_pretrained(tmp_path)
    model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.mem_layers == [] and model.config.num_key_value_heads == reference.config.num_key_value_heads
    assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    # a saved knnmem model round-trips, memory layers included
    model.config.mem_layers = [1]
    model.save_pretrained(tmp_path / "knnmem")
    again = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "knnmem").eval()
    assert again.config.mem_layers == [1] and again.config.rope.to_dict() == model.config.rope.to_dict()
    assert_close(logits(again, ids[:, :20]), logits(reference, ids[:, :20]), rtol=1e-5, atol=1e-5)


def test_sharded_and_bin_checkpoints_load(tmp_path, ids):
    reference = llama(num_key_value_heads=2)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    reference.config.save_pretrained(tmp_path / "bin")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for name in ("sharded", "bin"):
        model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_bin_checkpoints_load_without_running_their_pickles(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    llama().config.save_pretrained(tmp_path)
    torch.save({"model.norm.weight": torch.ones(32), "x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path)


def test_memory_layers_of_a_llama_checkpoint_are_named_at_load(tmp_path):
    llama(num_key_value_heads=2).save_pretrained(tmp_path)
    model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[0, 1], max_position_embeddings=16)
    assert model.config.mem_layers == [0, 1] and model.config.max_position_embeddings == 16
    # the window shrank, but rope scaling keeps referring to the checkpoint's own context length
    assert model.config.rope.max_position_embeddings == 64
    memory = knnmem.Memory.create(model, index="Flat")
    assert memory.num_heads == 2  # one index per key/value head


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "su", "rope_theta": 1e4}), "unknown rope_type 'su'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    (dict(sliding_window=8), r"fields \['sliding_window'\] are not supported"),
    (dict(pretraining_tp=2), "pretraining_tp"),
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_checkpoint_settings_are_refused_by_name(tmp_path, changes, message):
    llama().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path)
