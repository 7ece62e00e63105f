"""Sampling and the key/value-cached decoding loop behind ``Qwen3Transformer.generate``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qwen3_lightning.model import Qwen3Transformer
    from qwen3_lightning.tokenizer import CharTokenizer


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be a positive integer, or None to keep every token.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1], or None to keep every token.")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab): argmax when ``temperature == 0``, else a draw from the
    softmax at that temperature, restricted to the ``top_k`` most likely and the ``top_p`` nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass; the first always stays
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def decode_loop(
    model: Qwen3Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    attention_mask: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,), up to ``max_new_tokens`` times or until all rows met eos."""
    check_sampling_args(temperature, top_k, top_p)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, length) with length >= 1; got shape {tuple(input_ids.shape)}. "
            "Start an empty prompt with the <bos> token."
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    T = input_ids.shape[1]
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}; ask for at most {max(limit - T, 0)} new tokens."
        )
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention is faster
    return _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask, generator)


def _decode(
    model: Qwen3Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    attention_mask: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    from qwen3_lightning.model import KVCache

    if max_new_tokens == 0:
        return
    B, T = input_ids.shape
    weight = model.model.embed_tokens.weight
    cache = KVCache.allocate(model.config, B, T + max_new_tokens, weight.device, weight.dtype)
    position_ids = mask = None
    if attention_mask is not None:
        # left padding: real tokens count their positions from 0, as transformers' generate does
        mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens).long()], dim=1)
        position_ids = (mask[:, :T].cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids, attention_mask=None if mask is None else mask[:, :T], position_ids=position_ids, cache=cache
    )[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        yield token
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        if position_ids is not None:
            position_ids = position_ids[:, -1:] + 1
        logits = model(
            token[:, None],
            attention_mask=None if mask is None else mask[:, : T + step + 1],
            position_ids=position_ids,
            cache=cache,
        )[:, -1]


def encode_prompt(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """``<bos>`` followed by the prompt's ids; unknown characters become ``<unk>`` with one warning."""
    unknown = tokenizer.unknown_chars(prompt)
    if unknown:
        warnings.warn(
            f"the prompt has characters outside the vocabulary, read as <unk>: {''.join(sorted(unknown))}", stacklevel=3
        )
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt)]


@torch.no_grad()
def generate_text(
    model: Qwen3Transformer,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The continuation of ``prompt`` as text; ``on_text`` gets each new piece as soon as it is decoded."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    pieces = []
    for token in model.generate(
        ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eos_token_id, generator=generator, stream=True
    ):
        piece = tokenizer.decode(token.tolist())
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return "".join(pieces)
