import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import knnmem
from knnmem.model import attention
from conftest import tiny_config


def long_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def test_drop_in_equals_llama(make_model, ids):
    model = make_model(mem_layers=[], max_position_embeddings=64, last_context_length=64)
    config = model.config
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=64,
            rms_norm_eps=config.rms_norm_eps,
        )
    ).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask).logits
    got = long_logits(model, ids, attention_mask=mask)
    assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_memory_changes_the_output(make_model, ids):
    # Guards the tests below: with windows far shorter than the input, memory matters.
    with_memory = long_logits(make_model(), ids)
    without = long_logits(make_model(mem_layers=[]), ids)
    assert (with_memory - without)[:, 8:].abs().max() > 1e-2


@pytest.mark.parametrize("grouping", [(1, 1), (3, 2), (4, 100)])
def test_grouping_does_not_change_results(make_model, ids, grouping):
    reference = long_logits(make_model(), ids)
    assert_close(long_logits(make_model(mem_attention_grouping=grouping), ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mem_positionals", [True, False])
def test_torch_attention_does_not_change_results(make_model, ids, mem_positionals):
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding longer than a window
    reference = long_logits(make_model(mem_positionals=mem_positionals), ids, attention_mask=mask)
    fused = long_logits(make_model(mem_positionals=mem_positionals, torch_attention=True), ids, attention_mask=mask)
    assert_close(fused[mask.bool()], reference[mask.bool()], rtol=1e-5, atol=1e-5)


def test_bfloat16_memory_stays_close_to_float32(make_model, ids):
    exact = long_logits(make_model(mem_dtype="float32"), ids)
    stored_bf16 = long_logits(make_model(mem_dtype="bfloat16"), ids)
    # bfloat16 keeps 8 bits of mantissa: logits of this sharp random model move by well under 5%.
    scale = exact.abs().max()
    assert (stored_bf16 - exact).abs().max() < 0.05 * scale
    assert (stored_bf16 - exact).abs().max() > 0  # memory really is stored in bfloat16


def test_padding_rows_match_unpadded_rows(make_model):
    model = make_model()
    torch.manual_seed(3)
    row = torch.randint(1, 96, (1, 40))
    pad = 6
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(row)], dim=1)
    # Same tokens in the same windows: pads fill the first window's start, positions shift uniformly.
    alone = long_logits(model, torch.cat([torch.full((1, pad), 5), row], dim=1))
    batch = long_logits(model, torch.cat([padded, torch.cat([torch.full((1, pad), 5), row], 1)]),
                        attention_mask=torch.cat([mask, torch.ones_like(mask)]))
    assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch[0]).all()


def test_labels_give_shifted_cross_entropy(make_model, ids):
    model = make_model()
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels, use_cache=False)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_no_mask_grows_with_input_length(make_model, monkeypatch):
    widths = []
    original = attention.local_mask

    def recording(valid, num_queries):
        widths.append(valid.shape[-1])
        return original(valid, num_queries)

    monkeypatch.setattr(knnmem.model.modeling, "local_mask", recording)
    model = make_model(max_position_embeddings=8, last_context_length=5)
    long_logits(model, torch.randint(1, 96, (1, 300)))
    assert max(widths) == 8


def test_explicit_memory_is_filled_and_inspectable(make_model, ids):
    model = make_model()
    memory = knnmem.Memory.create(model)
    assert len(memory) == 0
    with torch.no_grad():
        out = model(ids, memory=memory, use_cache=False)
    assert len(memory) == ids.shape[1]  # no cache: every token ends in memory
    assert_close(out.logits, long_logits(model, ids))
    memory.reset()
    with torch.no_grad():
        model(ids, memory=memory, use_cache=True, last_context_length=5)
    assert len(memory) == ids.shape[1] - 5  # the last 5 tokens stay in the local cache


def test_memory_carries_over_between_calls(make_model, ids):
    model = make_model()
    memory = knnmem.Memory.create(model)
    first, second = ids[:, :24], ids[:, 24:]
    with torch.no_grad():
        model(first, memory=memory, use_cache=False)
        with_context = model(second, memory=memory, use_cache=False).logits
    assert (with_context - long_logits(model, second)).abs().max() > 1e-3


def test_generation_matches_step_by_step_forward(make_model):
    model = make_model(max_position_embeddings=8, last_context_length=6)
    torch.manual_seed(4)
    prompt = torch.randint(1, 96, (2, 21))
    generated = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 36)
    # Same thing by hand through the cache: overflowing the local cache moves it into memory.
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(14):
            out = model(tokens[-1][:, None], cache=out.cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(generated[:, 21:], torch.stack(tokens, 1))
    cache = out.cache
    assert len(cache) <= 8 and len(cache.memory) + len(cache) == 35


def test_cache_is_also_accepted_under_its_former_name(make_model):
    model = make_model(max_position_embeddings=8, last_context_length=6)
    prompt, token = torch.randint(1, 96, (1, 12)), torch.tensor([[5]])
    with torch.no_grad():
        expected = model(token, cache=model(prompt, use_cache=True).cache, use_cache=True).logits
        former = model(token, past_key_values=model(prompt, use_cache=True).cache, use_cache=True).logits
        assert torch.equal(former, expected)
        first = model(prompt, use_cache=True).cache
        with pytest.raises(ValueError, match="pass the cache once"):
            model(token, cache=first, past_key_values=first, use_cache=True)


def test_generate_with_explicit_memory_and_last_context_length(make_model):
    model = make_model()
    prompt = torch.randint(1, 96, (1, 30))
    memory = knnmem.Memory.create(model)
    out = model.generate(prompt, memory=memory, max_new_tokens=4, do_sample=False, last_context_length=10)
    assert out.shape == (1, 34)
    assert len(memory) >= 20


def test_sampling_and_beam_search_run(make_model):
    model = make_model()
    prompt = torch.randint(1, 96, (2, 20))
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=10)
    assert sampled.shape == (2, 32)
    beams = model.generate(prompt, max_new_tokens=12, num_beams=3, do_sample=False)
    assert beams.shape == (2, 32)
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False)
    single_beam = model.generate(prompt, max_new_tokens=12, num_beams=1, do_sample=False)
    assert torch.equal(greedy, single_beam)


def test_save_load_round_trip_and_auto_classes(make_model, ids, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    reference = long_logits(model, ids)
    loaded = knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(long_logits(loaded, ids), reference, rtol=0, atol=0)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, knnmem.LongLlamaForCausalLM)
    assert_close(long_logits(auto, ids), reference, rtol=0, atol=0)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), knnmem.LongLlamaConfig)


def test_published_config_with_auto_map_loads_without_remote_code(make_model, ids, tmp_path, caplog):
    model = make_model()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    data["auto_map"] = {
        "AutoConfig": "configuration_longllama.LongLlamaConfig",
        "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
    }
    data["architectures"] = ["LongLlamaForCausalLM"]
    data["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, knnmem.LongLlamaForCausalLM)
    assert not [r for r in caplog.records if "remote" in r.getMessage().lower()]
    assert_close(long_logits(auto, ids), long_logits(model, ids), rtol=0, atol=0)


def test_from_pretrained_overrides_memory_fields(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    loaded = knnmem.LongLlamaForCausalLM.from_pretrained(
        tmp_path, mem_layers=[2], mem_dtype="bfloat16", mem_positionals=False, mem_attention_grouping=(2, 4),
        last_context_length=7, torch_attention=True,
    )
    config = loaded.config
    assert (config.mem_layers, config.mem_dtype, config.mem_positionals) == ([2], "bfloat16", False)
    assert (config.mem_attention_grouping, config.last_context_length, config.torch_attention) == ([2, 4], 7, True)
    assert loaded.model.layers[2].self_attn.is_memory_layer and not loaded.model.layers[1].self_attn.is_memory_layer
    with pytest.raises(ValueError, match="out of range"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path, mem_layers=[5])


def test_loads_pytorch_bin_and_sharded_safetensors(make_model, ids, tmp_path):
    model = make_model()
    reference = long_logits(model, ids)
    model.config.save_pretrained(tmp_path / "bin")  # the layout of the published LongLLaMA 3B checkpoint
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_close(long_logits(knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "bin"), ids), reference)
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    assert_close(long_logits(knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path / "shards"), ids), reference)


def _rewrite_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_with_missing_tensor_names_it(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.self_attn.k_proj.weight'\]"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_mismatched_tensor_names_it(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda w: w.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"mismatched shapes: \['model.norm.weight \(31,\) in the checkpoint, \(32,\) in the config'\]"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_unexpected_tensor_names_it(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda w: w.update({"model.layers.9.mlp.up_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(ValueError, match="unexpected tensors: .*model.layers.9.mlp.up_proj.weight"):
        knnmem.LongLlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("shape", [(2, 44), (1, 45), (2, 45, 1), (3, 45)])
def test_attention_mask_of_wrong_shape(make_model, ids, shape):
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[\(2, 45\)\]"):
        make_model()(ids, attention_mask=torch.ones(shape, dtype=torch.long), use_cache=False)


def test_bad_call_arguments(make_model, ids):
    model = make_model()
    with pytest.raises(ValueError, match="last_context_length must be an integer >= 1, got 0"):
        model(ids, last_context_length=0)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(ids, position_ids=torch.arange(10)[None])
    with pytest.raises(ValueError, match="memory does not match the model"):
        model(ids, memory=knnmem.Memory(layers=[0], num_heads=4, head_dim=8, dtype=torch.float32))
    memory = knnmem.Memory.create(model)
    model(ids, memory=memory, use_cache=False)
    with pytest.raises(ValueError, match="memory holds 2 batch rows but the input has 1"):
        model(ids[:1], memory=memory, use_cache=False)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids, output_attentions=True)
