"""A deliberately naive restatement of LongLLaMA's window/memory semantics, token by token.

Written from the specification, not from knnmem's code: plain loops over tokens, one query at a
time, explicit lists for the local span and the memory. Slow, and meant to be obviously right.

The model state is a list of "spans": the tokens of one chunk (or of the local cache), each token
carrying its position. The memory of layer l is a list of raw (key, value) pairs, one per token that
was moved to memory, in order.
"""

import math

import torch


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean() + eps))


def rotate(vec, position, theta):
    """Rotary embedding of one head vector at one (relative) position."""
    half = vec.shape[0] // 2
    out = torch.empty_like(vec)
    for i in range(half):
        angle = position / theta ** (2 * i / vec.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = vec[i] * c - vec[i + half] * s
        out[i + half] = vec[i + half] * c + vec[i] * s
    return out


class NaiveLongLlama:
    def __init__(self, model):
        self.cfg = model.config
        self.w = {k: v.detach().double() for k, v in model.state_dict().items()}
        self.memory = {layer: [] for layer in self.cfg.mem_layers}  # layer -> [(key per head, value per head)]
        self.cache = []  # tokens in the local cache: dicts with position, valid, and per-layer raw k/v

    def _layer_weights(self, i, name):
        return self.w[f"model.layers.{i}.{name}"]

    def _step_layer(self, i, x, token, span):
        """Layer i for one token whose local span (earlier tokens of its chunk or cache) is `span`."""
        cfg, heads, dim = self.cfg, self.cfg.num_attention_heads, self.cfg.head_dim
        h = rms_norm(x, self._layer_weights(i, "input_layernorm.weight"), cfg.rms_norm_eps)
        q = (self._layer_weights(i, "self_attn.q_proj.weight") @ h).view(heads, dim)
        k = (self._layer_weights(i, "self_attn.k_proj.weight") @ h).view(heads, dim)
        v = (self._layer_weights(i, "self_attn.v_proj.weight") @ h).view(heads, dim)
        token["kv"][i] = (k, v)
        is_memory = i in cfg.mem_layers
        rotary = cfg.mem_positionals or not is_memory
        local = [t for t in span + [token] if t["valid"]]
        start = min(t["position"] for t in span + [token])  # positions are relative to the span start
        out = torch.zeros(heads, dim, dtype=torch.float64)
        for head in range(heads):
            query = rotate(q[head], token["position"] - start, cfg.rope_theta) if rotary else q[head]
            scores, values = [], []
            for other in local:
                key = other["kv"][i][0][head]
                key = rotate(key, other["position"] - start, cfg.rope_theta) if rotary else key
                scores.append(float(query @ key) / math.sqrt(dim))
                values.append(other["kv"][i][1][head])
            if is_memory:
                for key, value in self.memory[i]:  # stored as if at position 0: no rotation
                    scores.append(float(query @ key[head]) / math.sqrt(dim))
                    values.append(value[head])
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
            out[head] = sum(w * val for w, val in zip(weights, values))
        x = x + self._layer_weights(i, "self_attn.o_proj.weight") @ out.flatten()
        h = rms_norm(x, self._layer_weights(i, "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = self._layer_weights(i, "mlp.gate_proj.weight") @ h
        up = self._layer_weights(i, "mlp.up_proj.weight") @ h
        return x + self._layer_weights(i, "mlp.down_proj.weight") @ (torch.nn.functional.silu(gate) * up)

    def _run_span(self, tokens, span):
        """Each token of `tokens` in order, its local span being `span` plus the tokens before it."""
        logits = []
        for token in tokens:
            x = self.w["model.embed_tokens.weight"][token["id"]]
            for i in range(self.cfg.num_hidden_layers):
                x = self._step_layer(i, x, token, span)
            x = rms_norm(x, self.w["model.norm.weight"], self.cfg.rms_norm_eps)
            logits.append(self.w["lm_head.weight"] @ x)
            span = span + [token]
        return logits

    def _to_memory(self, tokens):
        for token in tokens:
            if token["valid"]:  # padding never enters memory
                for layer in self.cfg.mem_layers:
                    self.memory[layer].append(token["kv"][layer])

    def forward(self, ids, valid=None, last_context_length=None, use_cache=False):
        """Logits of every token of one sequence `ids`, continuing from the cache if there is one."""
        cfg = self.cfg
        last = last_context_length or cfg.last_context_length
        start = self.cache[-1]["position"] + 1 if self.cache else 0
        valid = valid or [True] * len(ids)
        tokens = [{"id": t, "position": start + n, "valid": ok, "kv": {}} for n, (t, ok) in enumerate(zip(ids, valid))]
        to_memory = max(len(tokens) - last, 0)
        chunks = [tokens[s:min(s + cfg.max_position_embeddings, to_memory)]
                  for s in range(0, to_memory, cfg.max_position_embeddings)]
        logits = []
        for chunk in chunks:  # windows that go straight to memory; the cache goes there first
            self._to_memory(self.cache)
            self.cache = []
            logits += self._run_span(chunk, [])
            self._to_memory(chunk)
        tail = tokens[to_memory:]
        if not use_cache:
            self._to_memory(self.cache)
            self.cache = []
            logits += self._run_span(tail, [])
            self._to_memory(tail)
            return torch.stack(logits)
        if self.cache and len(self.cache) + len(tail) > cfg.max_position_embeddings:
            self._to_memory(self.cache)  # the whole cache moves to memory when the new tokens would not fit
            self.cache = []
        logits += self._run_span(tail, self.cache)
        self.cache = self.cache + tail
        return torch.stack(logits)
