import pytest
import torch

import knnmem
from conftest import tiny_config


def test_defaults_match_published_longllama():
    config = knnmem.LongLlamaConfig()
    assert config.max_position_embeddings == 2048
    assert config.last_context_length == 1024
    assert config.mem_layers == []
    assert config.mem_positionals is True
    assert config.mem_dtype == "bfloat16" and config.memory_dtype == torch.bfloat16
    assert config.mem_attention_grouping is None
    assert config.torch_attention is False
    assert config.gradient_checkpoint_every_ith == 1
    assert config.rope_theta == 10000.0 and config.rope_scaling is None


def test_round_trip_through_dict_keeps_memory_fields():
    config = tiny_config(mem_attention_grouping=(2, 3), mem_positionals=False, rope_theta=1e6)
    again = knnmem.LongLlamaConfig.from_dict(config.to_dict())
    for field in ("mem_layers", "mem_attention_grouping", "mem_positionals", "rope_theta", "mem_dtype"):
        assert getattr(again, field) == getattr(config, field)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_scaling={"type": "su", "factor": 2.0}), "unknown rope_type 'su'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "beta": 1}), r"does not understand field\(s\) \['beta'\]"),
        (dict(mem_position_scheme="nope"), "mem_position_scheme 'nope' is unknown"),
        (dict(num_key_value_heads=3), r"must be a multiple of num_key_value_heads \(3\)"),
        (dict(mem_layers=[1, 3]), r"mem_layers \[3\] out of range"),
        (dict(mem_layers=[-1]), r"mem_layers \[-1\] out of range"),
        (dict(hidden_size=30), "hidden_size \\(30\\) must be divisible by num_attention_heads \\(4\\)"),
        (dict(last_context_length=0), "last_context_length must be an integer >= 1, got 0"),
        (dict(mem_attention_grouping=(0, 4)), "mem_attention_grouping"),
        (dict(mem_attention_grouping=(2, -1)), "mem_attention_grouping"),
        (dict(mem_dtype="int8"), "mem_dtype must be one of"),
    ],
)
def test_bad_config_is_rejected_with_a_message_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
