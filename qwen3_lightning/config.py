"""Model configuration: one dataclass, named presets, and conversion to and from transformers' config.json.

This module imports no torch, so configs can be read and checked anywhere.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Any, Literal

MatmulPrecision = Literal["highest", "high", "medium"]
"""The values of ``torch.set_float32_matmul_precision``: the CLI's ``--float32_matmul_precision`` and the
benchmark's (here, so that the benchmark needs neither the CLI nor jsonargparse)."""

# Shapes of the published checkpoints are from their config.json on the Hugging Face Hub
# (Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B); the small presets are ours, sized for a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_decoder_layer=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_decoder_layer=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
    ),
    "medium": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_decoder_layer=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
    ),
    "large": dict(
        hidden_size=768,
        intermediate_size=2304,
        num_decoder_layer=14,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_decoder_layer=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_decoder_layer=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
}


SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_decoder_layer",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
"""The sizes of the model: positive integers, each setting the shape of some weights."""
WEIGHT_SHAPE_FIELDS = (*SIZE_FIELDS, "attention_bias", "tie_word_embeddings")
"""Every field the weights' names and shapes depend on: a checkpoint resumes only into a config that agrees."""


def as_int(value: object) -> int | None:
    """``value`` as an ``int`` where it is a whole number (numpy and 0-d tensor integers too), else None: a
    bool, a float or a string is not one."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def as_float(value: object) -> float | None:
    """``value`` as a ``float`` where it is a number (numpy and 0-d tensor numbers too), else None: a bool or a
    string is not one."""
    if isinstance(value, bool | str):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass
class Qwen3Config:
    """The shape of a Qwen3 decoder. Field names follow the original trainer and transformers."""

    vocab_size: int = 1000
    """Number of token ids; set from the tokenizer when training."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    num_decoder_layer: int = 6
    """Number of decoder blocks."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int = 2
    """Key/value heads per layer (grouped-query attention); must divide num_attention_heads."""
    head_dim: int = 32
    """Width of each head; need not equal hidden_size / num_attention_heads."""
    attention_bias: bool = False
    """Bias on the q, k, v and o projections (Qwen3 has none)."""
    rope_theta: float = 1_000_000.0
    """Base of the rotary embedding's frequencies (1e6 in the published Qwen3 configs)."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    max_position_embeddings: int = 1024
    """Longest sequence, prompt and generated tokens together."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output projection."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialization of linear and embedding weights."""

    def __post_init__(self) -> None:
        # numpy numbers are taken as the Python ones; a string or None is refused rather than read as a bool
        for name in (*SIZE_FIELDS, "max_position_embeddings"):
            value = as_int(getattr(self, name))
            if value is None or value < 1:
                raise ValueError(f"Qwen3Config.{name}={getattr(self, name)!r} must be a positive integer.")
            setattr(self, name, value)
        for name in ("attention_bias", "tie_word_embeddings"):
            value = getattr(self, name)
            if type(value).__name__ not in ("bool", "bool_"):  # (numpy's bool_ too)
                raise ValueError(f"Qwen3Config.{name}={value!r} must be true or false, not a {type(value).__name__}.")
            setattr(self, name, bool(value))
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = as_float(getattr(self, name))
            if value is None or not value > 0:  # NaN fails every comparison
                raise ValueError(f"Qwen3Config.{name}={getattr(self, name)!r} must be a positive number.")
            setattr(self, name, value)
        if self.head_dim % 2:
            raise ValueError(
                f"Qwen3Config.head_dim={self.head_dim} must be even: the rotary embedding rotates pairs of channels."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}: each key/value head must serve the same "
                "number of query heads. Pick num_key_value_heads among the divisors of num_attention_heads."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Qwen3Config:
        """The named preset with any field replaced, e.g. ``from_preset("small", num_decoder_layer=8)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown Qwen3Config field(s) {unknown}; valid fields: {', '.join(sorted(known))}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def for_vocabulary(cls, preset: str, overrides: dict[str, Any] | None, vocab_size: int) -> Qwen3Config:
        """``from_preset(preset, **overrides)`` with the vocabulary's size, which the data sets, taking the place
        of any ``vocab_size`` in ``overrides``: how the LightningModule and its checkpoints build the model."""
        return cls.from_preset(preset, **{**(overrides or {}), "vocab_size": vocab_size})

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> Qwen3Config:
        """Reads a transformers Qwen3 ``config.json`` dict (transformers 4 or 5 layout). The sizes of the model
        are required; an optional field it leaves out (``head_dim``, ``tie_word_embeddings``, ``rope_theta``...)
        takes transformers' ``Qwen3Config`` default, so that both libraries build the same model from it."""
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(f"config.json has model_type={model_type!r}; only 'qwen3' models can be loaded.")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [key for key in required if key not in d]
        if absent:
            raise ValueError(
                f"config.json has no {', '.join(absent)}: a Qwen3 config.json names {', '.join(required)}."
            )
        rope_theta = d.get("rope_theta")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope_theta is None:
            rope_theta = rope.get("rope_theta", 10_000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))  # "type": the key of older config.json files
        if kind != "default":
            raise ValueError(f"rope_type={kind!r} is not supported; only the default rotary embedding.")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported; Qwen3's MLP uses silu.")
        sliding = d.get("use_sliding_window") and d.get("sliding_window", 4096) is not None
        if (sliding and d.get("max_window_layers", 28) < d["num_hidden_layers"]) or (
            "sliding_attention" in (d.get("layer_types") or [])
        ):
            raise ValueError(
                "config.json asks for sliding-window attention in some layers (use_sliding_window, "
                "max_window_layers or layer_types); only full attention in every layer is supported."
            )
        num_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_decoder_layer=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads", 32) or num_heads,  # null: as many as the heads
            head_dim=d.get("head_dim", 128) or d["hidden_size"] // num_heads,
            attention_bias=d.get("attention_bias", False),
            rope_theta=float(rope_theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            initializer_range=d.get("initializer_range", 0.02),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers Qwen3 ``config.json`` dict; rope theta is written in both the old and new places."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_decoder_layer,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "use_cache": True,
        }
