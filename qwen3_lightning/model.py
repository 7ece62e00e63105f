"""The Qwen3 decoder as a plain ``nn.Module``.

Parameter names are those of transformers' ``Qwen3ForCausalLM``, so its ``state_dict`` loads here and back
with ``load_state_dict`` and no mapping table. Nothing in this file imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen3_lightning.config import Qwen3Config


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (as Qwen3 does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary position embedding, half-split layout (channels i and i + d/2 pair up)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)

    def reset_parameters(self) -> None:
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # cast with the module (bf16-true, FSDP's mixed precision casts buffers too): frequencies rounded to
            # bf16 would turn the angles at position 1000 by up to a radian, so they are rebuilt in float32
            inv_freq = self._inv_freq(inv_freq.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
            return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (B, nh, T, hd) by the angles in ``cos``/``sin`` (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once for ``max_length`` positions.

    ``length`` is how many positions are filled; a forward pass with the cache appends its tokens there.
    With ``index`` set (a tensor of positions), a step writes at those positions instead and attends over the
    whole buffer, its mask hiding the slots not yet written: every step then has the same shapes, which is
    what lets ``torch.compile`` turn the decoding step into one graph.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    index: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new keys and values (B, nkv, T, hd) of ``layer``; returns all that attention may see."""
        keys, values = self.keys[layer], self.values[layer]
        k, v = k.to(keys.dtype), v.to(values.dtype)  # under autocast, k and v come in the autocast dtype
        if self.index is not None:
            keys.index_copy_(2, self.index, k)
            values.index_copy_(2, self.index, v)
            return keys, values
        start, end = self.length, self.length + k.shape[2]
        keys[:, :, start:end], values[:, :, start:end] = k, v
        return keys[:, :, :end], values[:, :, :end]

    @classmethod
    def allocate(
        cls, config: Qwen3Config, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        n = config.num_decoder_layer
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # Qwen3's QK-norm: RMSNorm over each head's channels, before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        is_causal = mask is None and T > 1 and (cache is None or cache.length == 0)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and final norm: transformers' ``Qwen3Model`` (the ``model.`` prefix)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_decoder_layer))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class Qwen3Transformer(nn.Module):
    """Qwen3 causal language model; numerically the same as transformers' ``Qwen3ForCausalLM``."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        """Recompute each decoder layer in the backward pass: less activation memory, about a third more compute."""
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialization: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T); only those of the last ``logits_to_keep`` positions
        when it is set (prefilling a prompt needs the last one alone).

        ``attention_mask`` (B, S) marks real tokens with 1 and padding with 0, left or right; with a cache it
        covers the cached positions too (S = cache.length + T). ``position_ids`` default to 0, 1, ... counted
        from the cache's length, as transformers does.
        """
        if cache is not None and cache.index is not None:
            return self._static_step(input_ids, attention_mask, position_ids, cache)
        T = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_length:
            raise ValueError(f"the cache holds {cache.max_length} positions; {past} are used and {T} more were given")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)  # (1, T): broadcasts
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = self._attention_mask(attention_mask, past, T, input_ids.device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.model.norm(x[:, -logits_to_keep:]))

    def _static_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """One token per row, written at ``cache.index``; ``attention_mask`` (B, max_length) marks the slots
        this token may see (the written ones, less padding). Shapes never change from step to step."""
        if input_ids.shape[1] != 1 or attention_mask is None or position_ids is None:
            raise ValueError(
                "a step at cache.index takes one token per row, its position_ids and a mask over the cache"
            )
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, max_length)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.lm_head(self.model.norm(x))

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device
    ) -> torch.Tensor | None:
        """A boolean (B, 1, T, S) mask, True where a query may attend; None when plain causal attention will do."""
        S = past + T
        if attention_mask is None:
            if past == 0 or T == 1:
                return None  # is_causal, or one new token that sees the whole cache
            key_padding = torch.ones(1, S, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape[-1] != S:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions; expected {S} "
                    f"({past} cached + {T} new)"
                )
            key_padding = attention_mask.bool()
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None] & key_padding[:, None, None, :]
        # A padding query that may see nothing would give NaN (softmax over no keys), and the NaN would leak
        # through later layers' values; letting every query see itself keeps padded rows finite.
        return mask | (k_pos == q_pos)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        stream: bool = False,
        compile: bool | str = False,
    ) -> torch.Tensor | Iterator[torch.Tensor]:
        """Continues each prompt by up to ``max_new_tokens`` tokens, with a key/value cache.

        ``temperature=0`` is greedy. Prompts of different lengths are left-padded with ``attention_mask``
        marking the real tokens. Returns (B, prompt + new) ids; rows that met ``eos_token_id`` are padded with it.
        With ``stream=True`` it returns an iterator of the new tokens (B,) one step at a time instead.
        ``compile=True`` runs the decoding step through ``torch.compile`` (one fixed-shape graph, compiled on the
        first call and reused): much less Python overhead per token, for long generations. ``compile="max-autotune"``
        also freezes the weights into the graph and picks GEMM kernels by timing them: on a CPU two to three times
        faster at batch 1 again, after a first call of tens of seconds; it recompiles if the weights change, and
        each recompile keeps its copy of the weights until the process ends (not for sampling during training).
        """
        from qwen3_lightning.generation import decode_loop

        steps = decode_loop(
            self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask, generator, compile
        )
        if stream:
            return steps
        new = list(steps)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids.clone()

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None) -> Qwen3Transformer:
        """Loads a transformers Qwen3 directory (config.json + safetensors), such as one written by ``export``;
        ``dtype`` is a ``torch.dtype`` or its name (float32, bfloat16, float16); None or ``"auto"`` keeps the
        dtype the weights are stored in."""
        from qwen3_lightning.interop import load_pretrained

        return load_pretrained(cls, Path(path), dtype)


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str, ignore_index: int | None = None) -> None:
    """Refuses token ids outside the vocabulary (0 to ``vocab_size - 1``; ``ignore_index`` is also taken), naming
    the id and the fix, where the embedding or the loss would stop with an IndexError from inside torch (on CUDA
    a device-side assert, which leaves the GPU unusable to the process). One reduction, one sync: for first
    batches and prompts, not every step."""
    if ids.numel() == 0:
        return
    if ignore_index is not None:
        ids = ids.masked_fill(ids == ignore_index, 0)
    low, high = (int(v) for v in torch.aminmax(ids))
    if low >= 0 and high < vocab_size:
        return
    skip = f"; {ignore_index} marks a position the loss skips" if ignore_index is not None else ""
    fix = (
        f"they come from a tokenizer with more tokens than the model has: build the model with vocab_size {high + 1} "
        "or more (model.vocab_size; the CLI takes it from the data), or tokenize with the model's own tokenizer"
        if low >= 0
        else "negative ids are no tokens: pad input_ids with a real token (TextDataModule pads with <pad>, id 0) "
        "and mark the padding in attention_mask, and labels with -100"
    )
    raise ValueError(
        f"{what} hold the token id {low if low < 0 else high}, outside the model's vocabulary of {vocab_size} "
        f"(ids 0 to {vocab_size - 1}{skip}): {fix}."
    )


def flops_per_token(config: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6 per weight of a matmul (2 forward, 4 backward) plus
    12 * layers * heads * head_dim * seq_len for the attention scores and their use, counted as if unmasked
    (PaLM, Chowdhery et al. 2022, appendix B). The input embedding is a lookup, not a matmul: it counts only as
    the lm_head it may be tied to; norms and biases are not matmuls either."""
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, k, v, o
    mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
    matmul_weights = c.num_decoder_layer * (attention + mlp) + c.vocab_size * c.hidden_size  # + lm_head
    return 6 * matmul_weights + 12 * c.num_decoder_layer * c.num_attention_heads * c.head_dim * seq_len
