import pytest
import torch

import knnmem


def tiny_config(**overrides) -> knnmem.LongLlamaConfig:
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=8,
        last_context_length=5,
        mem_layers=[1, 2],
        mem_dtype="float32",
        pad_token_id=0,
    )
    fields.update(overrides)
    return knnmem.LongLlamaConfig(**fields)


def sharp_model(config: knnmem.LongLlamaConfig, seed: int = 0) -> knnmem.LongLlamaForCausalLM:
    """A random model with large weights, so attention is far from uniform and errors show."""
    torch.manual_seed(seed)
    model = knnmem.LongLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(std=0.3)
    return model


@pytest.fixture
def make_model():
    return lambda seed=0, **overrides: sharp_model(tiny_config(**overrides), seed)


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(1, 96, (2, 45))
