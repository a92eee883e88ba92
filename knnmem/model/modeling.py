"""LongLLaMA in PyTorch: LLaMA whose memory layers also attend to a memory of earlier windows.

`LongLlamaModel.forward` is the window loop of the Focused Transformer: a long input is cut into
windows of `max_position_embeddings` tokens, each window runs through all layers, and after it the
memory layers' keys and values are written to the `Memory`, an explicit step of the loop. The last
`last_context_length` tokens go to the local cache (generation) or to memory (no cache).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..memory.manager import Memory
from .attention import apply_rotary, attend, group_queries, local_mask, relative_positions, ungroup_queries
from .cache import LongLlamaCache
from .config import LongLlamaConfig, check_last_context_length
from .adapters import ADAPTER_FILE, apply_adapter, read_adapter, read_checkpoint_config
from .positions import POSITION_SCHEMES

KeyValue = tuple[torch.Tensor, torch.Tensor]


class LongLlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LongLlamaMLP(nn.Module):
    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LongLlamaAttention(nn.Module):
    """Projects, applies rotary embeddings relative to the local span, and dispatches to `attend`.

    A memory layer also reads `memory` (never writes it: the window loop does), scoring it with the
    queries its position scheme gives, and with `mem_positionals=False` uses no rotary embeddings at
    all. With grouped-query attention, the query heads of a key/value head read it as one block.
    """

    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.is_memory_layer = layer_idx in config.mem_layers
        self.use_rotary = config.mem_positionals or not self.is_memory_layer
        self.rope = config.rope
        self.rope_scaling = self.rope.attention_scaling
        # Only dynamic and longrope frequencies depend on the positions seen; the others are computed once,
        # on first use (not here: models are built on the meta device when loaded).
        self.static_rope = self.rope.rope_type not in ("dynamic", "longrope")
        self.inv_freq: torch.Tensor | None = None
        self.memory_queries = POSITION_SCHEMES[config.mem_position_scheme]
        self.mem_distance = config.mem_position_distance
        if self.mem_distance is None:
            self.mem_distance = config.max_position_embeddings
        # Grouping bounds the (heads x queries x memory) score matrix in memory layers.
        self.grouping = config.mem_attention_grouping if self.is_memory_layer else None
        self.use_sdpa = config.torch_attention
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.static_rope:
            return apply_rotary(x, positions, self.rope.inv_freq(int(positions.max()) + 1), self.rope_scaling)
        if self.inv_freq is None or self.inv_freq.device != x.device:
            self.inv_freq = self.rope.inv_freq().to(x.device)
        return apply_rotary(x, positions, self.inv_freq, self.rope_scaling)

    def key_values(self, hidden: torch.Tensor) -> KeyValue:
        """The raw (unrotated) keys and values (B, Hkv, T, D) of `hidden`: what memory and cache store."""
        return self._heads(self.k_proj(hidden), self.num_kv_heads), self._heads(self.v_proj(hidden), self.num_kv_heads)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        past: tuple[torch.Tensor, ...] | None,
        memory: Memory | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        q = self._heads(self.q_proj(hidden), self.num_heads)  # (B, H, T, D)
        k, v = self.key_values(hidden)
        num_queries = q.shape[2]
        keys, values, span_positions, span_valid = k, v, positions, valid
        if past is not None:
            past_k, past_v, past_positions, past_valid = past
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, S, D)
            span_positions = torch.cat([past_positions, positions], dim=1)  # (B, S)
            span_valid = torch.cat([past_valid, valid], dim=1)
        raw_q = q
        if self.use_rotary:
            rel = relative_positions(span_positions)
            q = self._rotate(q, rel[:, -num_queries:])
            keys = self._rotate(keys, rel)
        groups = self.num_heads // self.num_kv_heads
        mask = local_mask(span_valid, num_queries).repeat(1, 1, groups, 1)  # (B, 1, G*T, S)
        if self.is_memory_layer and memory is not None:
            mem_q = self.memory_queries(raw_q, q, self._rotate, self.mem_distance) if self.use_rotary else q
            out = self._attend_with_memory(q, mem_q, keys, values, mask, memory, (k, v, valid))
        else:
            out = attend(group_queries(q, self.num_kv_heads), keys, values, mask, use_sdpa=self.use_sdpa)
        batch = hidden.shape[0]
        out = ungroup_queries(out, self.num_heads)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, num_queries, self.num_heads * self.head_dim)
        # Raw k, v are what memory and cache store: rotation by position 0 is the identity.
        return self.o_proj(out), (k, v)

    def _attend_with_memory(self, q, mem_q, keys, values, mask, memory: Memory, window) -> torch.Tensor:
        """Attention in blocks of (key/value heads, queries) of `mem_attention_grouping`; each block searches
        memory once, with the queries of all its query heads. Returns (B, Hkv, G*T, D)."""
        groups, length = self.num_heads // self.num_kv_heads, q.shape[2]
        group_heads, group_queries_ = self.grouping or (self.num_heads, length)
        kv_block = max(1, group_heads // groups)
        split = lambda x: x.unflatten(1, (self.num_kv_heads, groups))  # noqa: E731  (B, Hkv, G, T, D)
        q5, mem_q5, mask5 = split(q), split(mem_q), mask.view(mask.shape[0], 1, groups, length, -1)
        rows = []
        for h0 in range(0, self.num_kv_heads, kv_block):
            heads = slice(h0, min(h0 + kv_block, self.num_kv_heads))
            cols = []
            for t0 in range(0, length, group_queries_):
                block = slice(t0, t0 + group_queries_)
                flat = lambda x: x[:, heads, :, block].flatten(2, 3)  # noqa: E731  (B, h, G*t, D)
                hits = memory.search(self.layer_idx, flat(mem_q5), heads, window=window)
                out = attend(flat(q5), keys[:, heads], values[:, heads], mask5[:, :, :, block].flatten(2, 3), hits,
                             use_sdpa=self.use_sdpa)
                cols.append(out.unflatten(2, (groups, -1)))  # (B, h, G, t, D)
            rows.append(torch.cat(cols, dim=3))
        return torch.cat(rows, dim=1).flatten(2, 3)  # (B, Hkv, G*T, D)


class LongLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LongLlamaAttention(config, layer_idx)
        self.mlp = LongLlamaMLP(config)
        self.input_layernorm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def key_values(self, hidden) -> KeyValue:
        return self.self_attn.key_values(self.input_layernorm(hidden))

    def forward(self, hidden, positions, valid, past, memory) -> tuple[torch.Tensor, KeyValue]:
        attn_out, new_kv = self.self_attn(self.input_layernorm(hidden), positions, valid, past, memory)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, new_kv


class LongLlamaPreTrainedModel(PreTrainedModel):
    config_class = LongLlamaConfig
    config: LongLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LongLlamaDecoderLayer"]
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    # Checkpoints written by the original implementation also hold its rotary-embedding buffers.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: LongLlamaConfig, *args, **kwargs):
        config.validate_memory()
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, adapter=None, **kwargs):
        """`PreTrainedModel.from_pretrained` for every checkpoint family of `adapters.FAMILIES`.

        Keyword arguments naming config fields (`mem_layers`, `mem_dtype`, ...) override the saved config.
        `adapter` (a directory saved by `adapters.save_adapter`) sets memory fields and loads its tensors
        over these base weights.

        Raises:
            ValueError: the config cannot be run (named), tensors are missing, unexpected or wrongly shaped,
                or the adapter was made for another base model.
        """
        found = read_adapter(adapter) if adapter is not None else None
        if adapter is not None and found is None:
            raise ValueError(f"{adapter} holds no {ADAPTER_FILE}")
        if config is None:
            fields = set(LongLlamaConfig.__annotations__)
            overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in fields}
            overrides = {**(found or {}).get("config", {}), **overrides}
            config = read_checkpoint_config(pretrained_model_name_or_path, **overrides)
        return_info = kwargs.pop("output_loading_info", False)
        # Mismatched shapes are collected (not raised by transformers) so the error below can name them.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, config=config,
                                              output_loading_info=True, **kwargs)
        mismatched = [f"{name} {tuple(ckpt)} in the checkpoint, {tuple(cfg)} in the config"
                      for name, ckpt, cfg in sorted(info.get("mismatched_keys") or ())]
        problems = [
            f"{label}: {entries}"
            for label, entries in (
                ("missing tensors", sorted(info.get("missing_keys") or ())),
                ("tensors with mismatched shapes", mismatched),
                ("unexpected tensors", sorted(info.get("unexpected_keys") or ())),
            )
            if entries
        ]
        if problems:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match its LongLLaMA config: " + "; ".join(problems)
            )
        if found is not None:
            apply_adapter(model, adapter, found)
        return (model, info) if return_info else model


class LongLlamaModel(LongLlamaPreTrainedModel):
    """The LongLLaMA decoder (no head): window loop, local cache and memory writes."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LongLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LongLlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LongLlamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        memory: Memory | None = None,
        last_context_length: int | None = None,
        entries_only: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run an input of any length.

        Args:
            input_ids: (B, L) token ids (or `inputs_embeds` (B, L, C)).
            attention_mask: (B, L) or (B, tokens already seen + L); 0 marks padding.
            position_ids: (B, L) absolute positions; by default they continue from the cache.
            cache: a `LongLlamaCache` from an earlier call (generation; `past_key_values` is an alias).
            use_cache: keep the last tokens in a local cache and return it (default: `config.use_cache`).
            memory: the `Memory` to read and write (a `CrossBatchMemory` in FoT training); by default the
                cache's, else a new dense one.
            last_context_length: tokens at the end kept out of memory (default: the config's).
            entries_only: only write the input's entries to `memory` (no cache, no hidden states returned):
                layers above the last memory layer, and that layer's attention, are skipped, since
                stored keys and values do not depend on them.
        """
        cache = _cache_argument(cache, kwargs)
        _reject_unsupported(kwargs)
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, C)
        if embeds.dim() != 3 or embeds.shape[1] == 0:
            raise ValueError(f"expected a non-empty batch of sequences, got input shape {tuple(embeds.shape[:-1])}")
        batch, length = embeds.shape[:2]
        use_cache = config.use_cache if use_cache is None else use_cache
        last = check_last_context_length(
            config.last_context_length if last_context_length is None else last_context_length
        )
        if cache is not None and not isinstance(cache, LongLlamaCache):
            raise TypeError(f"cache must be a LongLlamaCache returned by this model, got {type(cache).__name__}")
        if cache is not None and not use_cache:
            raise ValueError("cache was given with use_cache=False; pass use_cache=True to continue a cache")
        if entries_only and (use_cache or cache is not None):
            raise ValueError("entries_only writes memory and keeps no cache: pass use_cache=False and no cache")
        valid = _padding_flags(attention_mask, batch, length, cache, embeds.device)
        positions = _positions(position_ids, batch, length, cache, embeds.device)
        window = config.max_position_embeddings
        memory = _resolve_memory(memory, cache)
        if memory is None:
            memory = Memory.create(config)  # memory/'s default: dense, in RAM
        memory.check_input(config, batch=batch, length=length, use_cache=use_cache)
        if use_cache and cache is None:
            cache = LongLlamaCache(memory, config.num_hidden_layers)

        to_memory = length if entries_only else max(length - last, 0)
        chunks = [(s, min(s + window, to_memory)) for s in range(0, to_memory, window)] + [(to_memory, length)]
        hidden_out = []
        for i, (start, end) in enumerate(chunks):
            span = slice(start, end)
            keep_in_cache = use_cache and i == len(chunks) - 1
            # The local cache holds at most one window: when this chunk would not fit (or goes straight
            # to memory), the whole cache moves to memory first.
            if cache is not None and len(cache) and (not keep_in_cache or len(cache) + end - start > window):
                self._write_memory(memory, [cache.layer(j)[:2] for j in range(len(self.layers))], cache.valid)
                cache.clear()
            past = cache if keep_in_cache else None
            if end == start:  # every token went to memory in full windows
                continue
            hidden, new_kv = self._forward_chunk(embeds[:, span], positions[:, span], valid[:, span], past, memory,
                                                 entries_only=entries_only)
            if keep_in_cache:
                cache.append(new_kv, positions[:, span], valid[:, span])
            else:
                self._write_memory(memory, new_kv, valid[:, span])
            hidden_out.append(hidden)
        if cache is not None:
            cache.seen_tokens += length
        return BaseModelOutputWithPast(
            last_hidden_state=None if entries_only else torch.cat(hidden_out, dim=1), cache=cache if use_cache else None
        )

    def _forward_chunk(self, embeds, positions, valid, cache, memory, *, entries_only: bool = False
                       ) -> tuple[torch.Tensor | None, list[KeyValue]]:
        """One chunk through every layer; returns final hidden states and each layer's new (k, v).

        With `entries_only`, the chunk stops at the last memory layer's keys and values (hidden states None).
        """
        hidden, new_kv = embeds, []
        every = self.config.gradient_checkpoint_every_ith
        last_memory_layer = max(self.config.mem_layers, default=-1)
        for idx, layer in enumerate(self.layers):
            if entries_only and idx == last_memory_layer:
                new_kv.append(layer.key_values(hidden))
                return None, new_kv
            past = cache.layer(idx) if cache is not None else None
            if self.gradient_checkpointing and self.training and idx % every == 0:
                hidden, kv = checkpoint(layer, hidden, positions, valid, past, memory, use_reentrant=False)
            else:
                hidden, kv = layer(hidden, positions, valid, past, memory)
            new_kv.append(kv)
        return self.norm(hidden), new_kv

    def _write_memory(self, memory: Memory, new_kv: list[KeyValue], valid: torch.Tensor) -> None:
        for layer in memory.layers:
            keys, values = new_kv[layer]
            memory.add(layer, keys, values, valid)


class LongLlamaForCausalLM(LongLlamaPreTrainedModel, GenerationMixin):
    """LongLLaMA with its language-modelling head; `generate` keeps one memory across all steps."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # used when tie_word_embeddings

    def __init__(self, config: LongLlamaConfig):
        super().__init__(config)
        self.model = LongLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own LongLlamaCache (local window + memory) on the first call.
        return False

    def _get_stopping_criteria(self, *args, **kwargs):
        # max_position_embeddings is the window, not a length limit: no "exceeded maximum length" warning.
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                criterion.max_position_embeddings = None
        return criteria

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LongLlamaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        memory: Memory | None = None,
        last_context_length: int | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As `LongLlamaModel.forward`, plus `labels` (B, L) for the shifted cross-entropy (-100 ignored)
        and `logits_to_keep` (compute logits of the last N tokens only; 0 = all)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            memory=memory,
            last_context_length=last_context_length,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
            if logits_to_keep:
                raise ValueError("labels need the logits of every token; do not combine them with logits_to_keep")
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(logits.device)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


def _cache_argument(cache: LongLlamaCache | None, kwargs: dict) -> LongLlamaCache | None:
    """The cache, also when passed under its former `transformers` name `past_key_values`."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None and cache is not None:
        raise ValueError("pass the cache once, as `cache` (past_key_values is its former name)")
    return cache if legacy is None else legacy


def _reject_unsupported(kwargs: dict) -> None:
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, None):
            raise ValueError(f"{flag}=True is not supported by LongLLaMA, which processes long inputs window by window")
    kwargs.pop("return_dict", None)
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")


def _resolve_memory(memory, cache: LongLlamaCache | None):
    """The memory to read and write: the cache's in generation, else the one given, else the default (dense)."""
    if cache is not None:
        if memory is not None and memory is not cache.memory:
            raise ValueError("memory differs from the memory of the cache; pass the same Memory on every step")
        return cache.memory
    if memory is None:
        return None  # the caller builds the default, which needs the config
    if not callable(getattr(memory, "search", None)) or not callable(getattr(memory, "check_input", None)):
        raise TypeError(f"memory must be a knnmem.Memory (or CrossBatchMemory), got {type(memory).__name__}")
    return memory


def _padding_flags(attention_mask, batch: int, length: int, cache: LongLlamaCache | None, device) -> torch.Tensor:
    """(B, L) bool: False for padding tokens of the new input."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    seen = cache.seen_tokens if cache is not None else 0
    allowed = {(batch, length), (batch, seen + length)}
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in allowed:
        raise ValueError(
            f"attention_mask must have shape {sorted(allowed)} (batch, new tokens or all tokens so far), "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -length:].to(device).bool()


def _positions(position_ids, batch: int, length: int, cache: LongLlamaCache | None, device) -> torch.Tensor:
    """(B, L) absolute positions, continuing after the cache's last token unless given."""
    if position_ids is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
        if cache is not None and cache.next_position is not None:
            start = cache.next_position
        return start[:, None] + torch.arange(length, device=device)
    if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape ({batch}, {length}), got {tuple(position_ids.shape)}")
    return position_ids.to(device).long().expand(batch, length)
