"""Memory adapters over a base checkpoint, and checkpoints resolved from GGUF files into the cache."""

import json

import pytest
import torch
from torch.testing import assert_close

import knnmem
from knnmem.model.adapters import read_adapter, resolve_checkpoint, save_adapter

from test_checkpoints import llama, logits
from test_gguf import write_gguf


def test_an_adapter_sets_memory_fields_and_loads_only_its_tensors(tmp_path):
    base = llama(num_key_value_heads=2)
    base.save_pretrained(tmp_path / "base")
    model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "base", mem_layers=[1], max_position_embeddings=16)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2)  # "trained"
    trained = ["model.layers.1.self_attn.q_proj.weight"]
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"), tensors=trained)
    assert read_adapter(tmp_path / "adapter")["weights"] == "adapter.safetensors"

    loaded = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert loaded.config.mem_layers == [1] and loaded.config.max_position_embeddings == 16
    assert torch.equal(loaded.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(1, 96, (1, 12))
    assert_close(logits(loaded.eval(), ids), logits(model.eval(), ids))


def test_an_adapter_for_another_base_is_refused(tmp_path):
    llama(seed=0).save_pretrained(tmp_path / "base")
    llama(seed=1).save_pretrained(tmp_path / "other")
    model = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "base", mem_layers=[0])
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"made for another base model: \['norm_sha256'\] differ"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "other", adapter=tmp_path / "adapter")
    with pytest.raises(ValueError, match="holds no adapter.json"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "other")


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNMEM_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "tiny.gguf")
    first = resolve_checkpoint(tmp_path / "tiny.gguf")
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint(tmp_path / "tiny.gguf") == first and (first / "config.json").stat().st_mtime_ns == stamp
    model = knnmem.LongLlamaForCausalLM.from_pretrained(first, mem_layers=[0])
    assert model.config.model_type == "longllama" and json.loads((first / "config.json").read_text())["model_type"] == "llama"


def test_sources_that_are_no_checkpoint_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_checkpoint(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="junk.gguf"):
        resolve_checkpoint(tmp_path / "junk.gguf")
