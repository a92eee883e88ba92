"""Rotary-embedding frequencies for every rope type of `transformers`' LLaMA, from a checkpoint's config.

`rope_from_config` normalises the two spellings of rope settings (transformers 5's `rope_parameters`
and the legacy `rope_scaling` + `rope_theta`) into a `Rope`, whose `inv_freq` and `attention_scaling`
equal what `transformers.LlamaRotaryEmbedding` computes (float32, to about 1e-6), so a checkpoint
trained with scaled rope runs here with the positions it was trained with. Pure torch, on purpose:
the formulas are re-derived here rather than imported, so they cannot drift with transformers' version
unnoticed (tests compare them with transformers').
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_THETA = 10000.0

# Fields each rope type reads besides `rope_theta`/`partial_rotary_factor`, as (required, optional).
# Anything else is refused: a field we ignored would silently change the positions a checkpoint expects.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"factor", "attention_factor"}),
    ),
    "llama3": (
        frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
        frozenset(),
    ),
    "proportional": (frozenset(), frozenset({"factor"})),
}
ROPE_TYPES = tuple(_FIELDS)

# Types whose pretraining length defaults to `max_position_embeddings` when the config omits it (as in transformers).
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    """Normalised rope settings of a checkpoint.

    Attributes:
        rope_type: one of `ROPE_TYPES`.
        theta: the base wavelength (`rope_theta`).
        head_dim: size of one attention head.
        max_position_embeddings: of the checkpoint config (dynamic scaling starts past it).
        params: the type's own fields, e.g. `factor`, `original_max_position_embeddings`, `low_freq_factor`,
            `beta_fast`, `short_factor`, and `partial_rotary_factor` when the config sets it.
    """

    rope_type: str
    theta: float
    head_dim: int
    max_position_embeddings: int
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a private copy, so the caller's dict changing later cannot change this frozen value
        object.__setattr__(self, "params", dict(self.params))
        if self.rope_type not in _FIELDS:
            raise ValueError(f"unknown rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        required, optional = _FIELDS[self.rope_type]
        unknown = sorted(set(self.params) - required - optional - {"partial_rotary_factor"})
        if unknown:
            raise ValueError(f"rope_type {self.rope_type!r} does not understand field(s) {unknown}")
        missing = sorted(required - set(self.params))
        if missing:
            raise ValueError(f"rope_type {self.rope_type!r} requires field(s) {missing}")
        if not _is_number(self.theta) or self.theta <= 0:
            raise ValueError(f"rope theta must be a positive number, got {self.theta!r}")
        if not _is_int(self.head_dim) or self.head_dim < 2:
            raise ValueError(f"head_dim must be an integer >= 2, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be an integer >= 1, got {self.max_position_embeddings!r}")
        self._check_params()

    def _check_params(self) -> None:
        p, optional = self.params, _FIELDS[self.rope_type][1]
        for name in ("factor", "attention_factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                     "mscale", "mscale_all_dim", "partial_rotary_factor"):
            # None is how transformers spells "use the default" for a type's optional fields
            if name in p and not (_is_number(p[name]) or (p[name] is None and name in optional)):
                raise ValueError(f"rope field {name}={p[name]!r} must be a number")
        for name in ("factor", "partial_rotary_factor"):
            if p.get(name) is not None and p[name] <= 0:
                raise ValueError(f"rope field {name}={p[name]!r} must be positive")
        if p.get("partial_rotary_factor", 1.0) > 1.0:
            raise ValueError(f"partial_rotary_factor={p['partial_rotary_factor']!r} must be <= 1")
        if self.rope_type == "default" and p.get("partial_rotary_factor", 1.0) != 1.0:
            # transformers' LLaMA rotates the whole head for this type whatever the factor says; neither
            # honouring nor ignoring it would be both exact and explicit, so refuse
            raise ValueError(
                f"partial_rotary_factor={p['partial_rotary_factor']!r} with rope_type 'default': transformers' "
                "LLaMA ignores it for this type; remove it from the config or set it to 1.0"
            )
        if self.rotary_dim < 2:
            raise ValueError(f"partial_rotary_factor={p['partial_rotary_factor']!r} leaves no dimension to rotate")
        if "original_max_position_embeddings" in p:
            orig = p["original_max_position_embeddings"]
            if not _is_int(orig) or orig < 1:
                raise ValueError(f"original_max_position_embeddings must be an integer >= 1, got {orig!r}")
        if "truncate" in p and not isinstance(p["truncate"], bool):
            raise ValueError(f"rope field truncate={p['truncate']!r} must be a bool")
        if self.rope_type == "llama3" and p["high_freq_factor"] == p["low_freq_factor"]:
            raise ValueError(
                f"llama3 rope needs high_freq_factor != low_freq_factor, both are {p['low_freq_factor']!r}"
            )
        if self.rope_type == "dynamic" and self.rotary_dim <= 2:
            raise ValueError(f"dynamic rope needs a rotary dimension > 2, got {self.rotary_dim}")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                values = p[name]
                if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
                    raise ValueError(f"longrope field {name} must be a list of numbers, got {values!r}")
                if len(values) != self.rotary_dim // 2:
                    raise ValueError(
                        f"longrope field {name} has {len(values)} values, expected rotary_dim // 2 = "
                        f"{self.rotary_dim // 2}"
                    )

    @property
    def rotary_dim(self) -> int:
        """Leading head dimensions that rotate: `head_dim` unless `partial_rotary_factor` < 1."""
        return int(self.head_dim * self.params.get("partial_rotary_factor", 1.0))

    @property
    def original_max_position_embeddings(self) -> int:
        """Pretraining context length the scaling is relative to (`max_position_embeddings` if unscaled)."""
        return self.params.get("original_max_position_embeddings", self.max_position_embeddings)

    def inv_freq(self, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies, as `LlamaRotaryEmbedding` holds them after seeing positions `< seq_len`.

        Args:
            seq_len: the longest position + 1 seen so far; matters only for "dynamic" (rescaled past
                `max_position_embeddings`) and "longrope" (long factors past the original length). None
                means the state at initialisation.

        Returns:
            `(rotary_dim // 2,)` float32 (`(head_dim // 2,)` for "proportional", whose non-rotating tail is 0),
            on the CPU. `rotary_dim == head_dim` unless `partial_rotary_factor` < 1.
        """
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be None or an integer >= 1, got {seq_len!r}")
        p, dim = self.params, self.rotary_dim
        if self.rope_type == "proportional":
            return self._proportional()
        theta = float(self.theta)
        if self.rope_type == "dynamic":
            # NTK-aware: raise the base as the sequence outgrows the trained window, never below it
            length = max(seq_len or self.max_position_embeddings, self.max_position_embeddings)
            factor = p["factor"]
            theta = theta * (factor * length / self.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        if self.rope_type == "longrope":
            long = seq_len is not None and seq_len > self.original_max_position_embeddings
            ext = torch.tensor(p["long_factor" if long else "short_factor"], dtype=torch.float32)
            return 1.0 / (ext * theta**exponents)
        inv_freq = 1.0 / (theta**exponents)
        if self.rope_type == "linear":
            return inv_freq / p["factor"]
        if self.rope_type == "llama3":
            return self._llama3(inv_freq)
        if self.rope_type == "yarn":
            return self._yarn(theta, exponents)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # Llama 3.1: wavelengths longer than the pretraining window are interpolated by `factor`, short ones
        # kept, and the band between them blended linearly in (context / wavelength)
        p = self.params
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        context = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, blended, scaled)

    def _yarn(self, theta: float, exponents: torch.Tensor) -> torch.Tensor:
        # YaRN: dimensions that rotate fewer than `beta_slow` times over the original window are interpolated,
        # those rotating more than `beta_fast` times extrapolated, with a linear ramp between
        p, dim = self.params, self.rotary_dim
        beta_fast = p.get("beta_fast") or 32  # `or`: transformers treats 0/None as unset
        beta_slow = p.get("beta_slow") or 1
        context = p["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid dividing by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolated = 1.0 / theta**exponents
        interpolated = 1.0 / (p["factor"] * theta**exponents)
        keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
        return interpolated * (1 - keep) + extrapolated * keep

    def _proportional(self) -> torch.Tensor:
        # Only the first `partial_rotary_factor` of the angles rotate, but with exponents over the whole head;
        # the rest get frequency 0 (cos 1, sin 0), so the result always spans the head
        angles = int(self.params.get("partial_rotary_factor", 1.0) * self.head_dim // 2)
        exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / self.head_dim
        rotating = 1.0 / (float(self.theta) ** exponents)
        inv_freq = torch.cat((rotating, torch.zeros(self.head_dim // 2 - angles, dtype=torch.float32)))
        factor = self.params.get("factor")
        return inv_freq / (1.0 if factor is None else factor)

    @property
    def attention_scaling(self) -> float:
        """Multiplier of cos and sin (YaRN's and LongRoPE's attention temperature); 1.0 for the other types."""
        p = self.params
        if p.get("attention_factor") is not None:
            return float(p["attention_factor"])
        if self.rope_type == "yarn":
            factor = p["factor"]
            if p.get("mscale") and p.get("mscale_all_dim"):
                return float(_yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"]))
            return float(_yarn_mscale(factor))
        if self.rope_type == "longrope":
            orig = p["original_max_position_embeddings"]
            # Phi-3 style configs leave `factor` out and imply it by the two lengths
            factor = p.get("factor") or self.max_position_embeddings / orig
            return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return 1.0

    def __hash__(self) -> int:
        # the generated hash would fail on the `params` dict; equal settings give equal dicts
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """JSON-serialisable settings, for recording in store manifests; equal dicts mean equal positions."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.params.items())}
        return {
            "rope_type": self.rope_type,
            "theta": float(self.theta),
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "params": params,
        }


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(config: Any, name: str) -> Any:
    """Field `name` of a config mapping or object, None when absent."""
    if isinstance(config, Mapping):
        return config.get(name)
    try:
        return getattr(config, name, None)
    except Exception:  # a deprecated property may raise rather than return
        return None


def rope_from_config(config: Any) -> Rope:
    """The `Rope` of a config object (e.g. `transformers.LlamaConfig`) or `config.json` dict.

    Reads `rope_parameters` (transformers 5) or the legacy `rope_scaling` + `rope_theta`; `head_dim`
    explicit or `hidden_size // num_attention_heads`; `partial_rotary_factor` if present. Like
    transformers, a top-level `original_max_position_embeddings` takes priority for the types that use it
    and `max_position_embeddings` fills it in when absent.

    Raises:
        ValueError: naming an unknown rope type, a field the type does not understand, a missing required
            field, or two spellings of one setting that disagree.
    """
    if isinstance(config, Mapping):
        parameters = config.get("rope_parameters")
        scaling = config.get("rope_scaling")
    else:
        parameters = _get(config, "rope_parameters")
        # on transformers 5 configs `rope_scaling` is a deprecated alias of `rope_parameters`: skip it
        scaling = None if parameters else _get(config, "rope_scaling")
    if parameters and scaling and dict(parameters) != dict(scaling):
        raise ValueError(f"rope_parameters {dict(parameters)!r} and rope_scaling {dict(scaling)!r} disagree")
    rope = dict(parameters or scaling or {})
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"per-layer rope_parameters (keys {sorted(rope)}) are not supported by LLaMA")

    rope_type = rope.pop("rope_type", None)
    legacy_type = rope.pop("type", None)  # pre-4.45 spelling
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ValueError(f"rope_type {rope_type!r} and type {legacy_type!r} disagree")
    rope_type = rope_type or legacy_type or "default"

    theta = _merge(rope.pop("rope_theta", None), _get(config, "rope_theta"), "rope_theta")
    theta = DEFAULT_THETA if theta is None else theta
    partial = _merge(rope.pop("partial_rotary_factor", None), _get(config, "partial_rotary_factor"),
                     "partial_rotary_factor")
    if partial is not None:
        rope["partial_rotary_factor"] = partial

    max_positions = _get(config, "max_position_embeddings")
    if max_positions is None:
        raise ValueError("config has no max_position_embeddings")
    if rope_type in _NEEDS_ORIGINAL_MAX:
        top_level = _get(config, "original_max_position_embeddings")
        if top_level is not None:
            rope["original_max_position_embeddings"] = top_level
        rope.setdefault("original_max_position_embeddings", max_positions)

    head_dim = _get(config, "head_dim")
    if head_dim is None:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if hidden is None or not heads:
            raise ValueError("config has neither head_dim nor hidden_size and num_attention_heads")
        head_dim = hidden // heads
    return Rope(rope_type=rope_type, theta=theta, head_dim=head_dim, max_position_embeddings=max_positions,
                params=rope)


def _merge(inner: Any, outer: Any, name: str) -> Any:
    """One setting spelt both inside the rope dict and at the config's top level: they must agree."""
    if inner is not None and outer is not None and inner != outer:
        raise ValueError(f"{name} is {inner!r} in the rope parameters but {outer!r} in the config")
    return inner if inner is not None else outer
