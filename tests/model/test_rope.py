"""`knnmem.model.rope` against transformers' own rope functions, for every rope type LLaMA supports."""

import json
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from knnmem.model.rope import Rope, rope_from_config

HEAD_DIM = 64
BASE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            intermediate_size=64, num_hidden_layers=1, vocab_size=32)

# (name, rope_parameters, extra LlamaConfig kwargs); rope_theta is included, as transformers 5 stores it
CASES = [
    ("default", {"rope_type": "default", "rope_theta": 10000.0}, {}),
    ("default-theta", {"rope_type": "default", "rope_theta": 500000.0}, {}),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, {}),
    ("dynamic", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, {}),
    ("llama3", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}, {}),
    ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 1024}, {}),
    ("yarn-full", {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "beta_fast": 16, "beta_slow": 2,
                   "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False,
                   "original_max_position_embeddings": 256}, {}),
    ("yarn-untruncated", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "truncate": False,
                          "original_max_position_embeddings": 1024}, {}),
    ("yarn-attention-factor", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                               "attention_factor": 1.25}, {}),
    ("yarn-partial", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                      "original_max_position_embeddings": 1024}, {}),
    ("longrope", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 40 for i in range(32)],
                  "long_factor": [1.0 + i / 4 for i in range(32)], "original_max_position_embeddings": 1024}, {}),
    ("longrope-factor", {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0,
                         "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
                         "original_max_position_embeddings": 512}, {}),
    ("linear-partial", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                        "partial_rotary_factor": 0.25}, {}),
    ("proportional", {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}, {}),
    ("explicit-head-dim", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, {"head_dim": 32}),
    ("llama3-top-level-original", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     {"original_max_position_embeddings": 2048}),
]
PARAMETERS = {name: parameters for name, parameters, _ in CASES}


def llama_config(parameters: dict, **extra) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **extra}, rope_parameters=dict(parameters))


def reference(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """What transformers' LLaMA computes: its rotary module at init, then (dynamic) at `seq_len`."""
    module = LlamaRotaryEmbedding(config)
    if seq_len is not None:
        x = torch.zeros(1, dtype=torch.float32)
        module(x, torch.arange(seq_len)[None])  # lets dynamic/longrope update their frequencies
    return module.inv_freq.clone(), float(module.attention_scaling)


@pytest.mark.parametrize("name,parameters,extra", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers_at_init(name, parameters, extra):
    config = llama_config(parameters, **extra)
    rope = rope_from_config(config)
    want, want_scaling = reference(config)
    got = rope.inv_freq()
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(want_scaling, rel=1e-12)


@pytest.mark.parametrize("name,parameters,extra", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers_init_functions(name, parameters, extra):
    """Also against `ROPE_INIT_FUNCTIONS` directly, at a length past the original window."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if parameters["rope_type"] == "default":
        pytest.skip("default has no entry in ROPE_INIT_FUNCTIONS (covered by LlamaRotaryEmbedding)")
    config = llama_config(parameters, **extra)
    rope = rope_from_config(config)
    seq_len = 3 * config.max_position_embeddings
    want, want_scaling = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, seq_len=seq_len)
    torch.testing.assert_close(rope.inv_freq(seq_len), want, rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(want_scaling, rel=1e-12)


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 6000, 20000])
def test_dynamic_follows_the_longest_sequence(seq_len):
    config = llama_config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    rope = rope_from_config(config)
    want, _ = reference(config, seq_len)
    torch.testing.assert_close(rope.inv_freq(seq_len), want, rtol=1e-6, atol=0)
    unscaled = rope_from_config(llama_config({"rope_type": "default", "rope_theta": 10000.0})).inv_freq()
    if seq_len <= config.max_position_embeddings:
        torch.testing.assert_close(rope.inv_freq(seq_len), unscaled, rtol=0, atol=0)
    else:
        assert (rope.inv_freq(seq_len)[1:] < unscaled[1:]).all()  # the base grew


@pytest.mark.parametrize("seq_len", [1024, 1025, 8000])
def test_longrope_switches_to_long_factors_past_the_original_window(seq_len):
    config = llama_config(PARAMETERS["longrope"])
    rope = rope_from_config(config)
    want, _ = reference(config, seq_len)
    torch.testing.assert_close(rope.inv_freq(seq_len), want, rtol=1e-6, atol=0)


def test_yarn_attention_scaling_is_not_one():
    rope = rope_from_config(llama_config(PARAMETERS["yarn"]))
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)


LEGACY = [
    ({"rope_theta": 500000.0, "rope_scaling": None}, {"rope_type": "default", "rope_theta": 500000.0}),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}},
     PARAMETERS["llama3"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}, PARAMETERS["yarn"]),
    ({}, {"rope_type": "default", "rope_theta": 10000.0}),
]


@pytest.mark.parametrize("legacy,parameters", LEGACY)
def test_legacy_spelling_parses_like_rope_parameters(legacy, parameters):
    new = rope_from_config({**BASE, "rope_parameters": parameters})
    assert rope_from_config({**BASE, **legacy}) == new
    # and transformers turns the legacy kwargs into the same thing
    config = LlamaConfig(**BASE, **legacy)
    assert rope_from_config(config) == new
    assert rope_from_config(config.to_dict()) == new
    assert rope_from_config(llama_config(parameters)) == new
    torch.testing.assert_close(new.inv_freq(), reference(config)[0], rtol=1e-6, atol=0)


def test_reads_plain_config_objects():
    """Objects without `rope_parameters` (like knnmem's own config) are read through the legacy fields."""
    from types import SimpleNamespace

    config = SimpleNamespace(**BASE, rope_theta=500000.0, rope_scaling=None)
    assert rope_from_config(config) == rope_from_config({**BASE, "rope_theta": 500000.0})
    config.rope_scaling = {"type": "linear", "factor": 2.0}
    assert rope_from_config(config).params == {"factor": 2.0}


def test_head_dim_defaults_to_hidden_over_heads():
    rope = rope_from_config({"hidden_size": 96, "num_attention_heads": 3, "max_position_embeddings": 8})
    assert rope.head_dim == 32 and rope.inv_freq().shape == (16,)
    assert rope_from_config({**BASE, "head_dim": 16}).head_dim == 16


def test_original_max_defaults_to_max_position_embeddings():
    rope = rope_from_config({**BASE, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    assert rope.params["original_max_position_embeddings"] == BASE["max_position_embeddings"]


def test_unknown_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'su'"):
        rope_from_config({**BASE, "rope_scaling": {"type": "su", "factor": 2.0}})


def test_unknown_field_is_refused_by_name():
    with pytest.raises(ValueError, match="bogus"):
        rope_from_config({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "bogus": 1}})
    # a real field of another type is unknown to this one too
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_from_config({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_from_config({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0,
                                                   "original_max_position_embeddings": 10}})


def test_missing_field_is_refused_by_name():
    with pytest.raises(ValueError, match="factor"):
        rope_from_config({**BASE, "rope_scaling": {"type": "linear"}})
    with pytest.raises(ValueError, match="high_freq_factor"):
        rope_from_config({**BASE, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}})


def test_disagreeing_spellings_are_refused():
    with pytest.raises(ValueError, match="rope_theta"):
        rope_from_config({**BASE, "rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}})
    with pytest.raises(ValueError, match="disagree"):
        rope_from_config({**BASE, "rope_scaling": {"type": "linear", "rope_type": "dynamic", "factor": 2.0}})


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="factor"):
        rope_from_config({**BASE, "rope_scaling": {"type": "linear", "factor": "2"}})
    with pytest.raises(ValueError, match="short_factor"):
        rope_from_config({**BASE, "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                   "long_factor": [1.0] * 32}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope_from_config({**BASE, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="seq_len"):
        rope_from_config(BASE).inv_freq(0)


def test_to_dict_is_json_and_records_everything():
    rope = rope_from_config(llama_config(PARAMETERS["longrope"]))
    recorded = json.loads(json.dumps(rope.to_dict()))
    assert recorded == rope.to_dict()
    rebuilt = Rope(recorded["rope_type"], recorded["theta"], recorded["head_dim"],
                   recorded["max_position_embeddings"], recorded["params"])
    assert rebuilt == rope and hash(rebuilt) == hash(rope)


def test_params_are_a_private_copy():
    params = {"factor": 2.0}
    rope = Rope("linear", 10000.0, 8, 16, params)
    params["factor"] = 3.0
    assert rope.params == {"factor": 2.0}


def test_does_not_import_transformers():
    """Loaded on its own (the `knnmem` package itself imports transformers), the module must stay pure torch."""
    import subprocess
    import sys

    import knnmem.model.rope as module

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('rope', {module.__file__!r})\n"
        "mod = sys.modules['rope'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "assert 'transformers' not in sys.modules, 'rope imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
