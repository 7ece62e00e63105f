"""Sampling and the key/value-cached decoding loop behind ``Qwen3Transformer.generate``."""

from __future__ import annotations

import functools
import itertools
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from qwen3_lightning.config import as_float, as_int

if TYPE_CHECKING:
    from qwen3_lightning.model import Qwen3Transformer
    from qwen3_lightning.tokenizer import CharTokenizer


GENERATE_DEFAULTS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 50, "top_p": None, "compile": False}
"""What ``generate_kwargs`` of the ``predict`` subcommand may set, and the values it starts from."""


def check_generate_kwargs(kwargs: dict[str, object]) -> dict[str, object]:
    """``GENERATE_DEFAULTS`` updated with ``kwargs``, checked: an unknown option or a bad value is an error now,
    not after a checkpoint has loaded."""
    unknown = sorted(set(kwargs) - set(GENERATE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"model.generate_kwargs has unknown option(s) {unknown}; the options are {', '.join(GENERATE_DEFAULTS)}."
        )
    settings = {**GENERATE_DEFAULTS, **kwargs}
    try:
        check_decoding_args(**{k: settings[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens", "compile")})
    except ValueError as err:
        raise ValueError(f"model.generate_kwargs: {err}") from None
    return settings


def check_decoding_args(
    temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int = 0, compile: bool | str = False
) -> int:
    """The checks of every way in to decoding (``generate``, the CLI's, ``model.generate_kwargs``): a bad value
    is an error before a checkpoint loads or a prompt is encoded. Returns ``max_new_tokens`` as an ``int`` (it
    may come as a numpy or 0-d tensor integer)."""
    new = as_int(max_new_tokens)
    if new is None or new < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 0.")
    if compile not in COMPILE_CHOICES:
        raise ValueError(
            f"compile={compile!r}: choose False, True (torch.compile) or 'max-autotune' (in YAML and on the command "
            "line: false, true, max-autotune)."
        )
    t = as_float(temperature)
    if t is None or not t >= 0 or t == float("inf"):  # NaN fails every comparison
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy decoding).")
    k = as_int(top_k)
    if top_k is not None and (k is None or k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive whole number, or None to keep every token.")
    p = as_float(top_p)
    if top_p is not None and (p is None or not 0 < p <= 1):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1], or None to keep every token.")
    return new


NUCLEUS_CANDIDATES = 256
"""``top_p`` without ``top_k`` looks for the nucleus among this many most likely tokens first; only a row where
they hold less than ``top_p`` of the probability makes it sort the whole vocabulary."""


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab): argmax when ``temperature`` is 0 (or below float32's
    smallest normal number, which float32 may hold as 0), else a draw from the softmax at that temperature,
    restricted to the ``top_k`` most likely tokens (exactly k: a tie at the k-th is broken by ``torch.topk``)
    and to the ``top_p`` nucleus. Only the tokens still in play are sorted and summed: after ``top_k``, k of
    them; for ``top_p`` alone, usually the ``NUCLEUS_CANDIDATES`` most likely."""
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    logits = logits.float()
    ids = None  # the token ids of the columns of logits, once they are fewer than the vocabulary
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, top_k, dim=-1)  # most likely first
    # the largest logit becomes 0 first: a tiny temperature then sends the others to -inf, never inf - inf = NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_p is not None and top_p < 1:
        log_total = logits.logsumexp(dim=-1, keepdim=True)  # of the tokens in play: after top_k, the k
        if ids is None:
            logits, ids = _nucleus_candidates(logits, log_total, top_p)
        probs = (logits - log_total).exp()
        # drop a token when the tokens before it already hold top_p of the mass; the first always stays
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    choice = draw(logits.softmax(dim=-1), generator)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _nucleus_candidates(
    logits: torch.Tensor, log_total: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, most likely first, among which every row's ``top_p`` nucleus lies: those that
    follow a set already holding ``top_p`` of the probability are never in it."""
    n = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    values, ids = torch.topk(logits, n, dim=-1)
    if n < logits.shape[-1] and bool(((values - log_total).exp().sum(dim=-1) < top_p).any()):
        return torch.sort(logits, dim=-1, descending=True)
    return values, ids


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column per row of ``probs`` (B, n), drawn with those probabilities (a row need not sum to 1, and a
    column of probability 0 is never drawn): where a uniform number falls in the running sum of the row. One
    random number per row, where ``torch.multinomial`` draws one per column (ten times slower here, for a few
    thousand columns)."""
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(dtype).cumsum(dim=-1)
    empty = ~(cdf[:, -1] > 0)  # NaN too
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(
            f"nothing to sample from in row(s) {rows[:8]}: their logits are NaN or all -inf (weights that "
            "overflowed, as float16 ones can, give such logits)"
        )
    cdf = cdf / cdf[:, -1:]  # ends at exactly 1 from the last column of any probability on: above every u
    u = torch.rand((len(cdf), 1), dtype=dtype, device=probs.device, generator=generator)  # in [0, 1)
    # the first column whose running sum exceeds u: never one of probability 0, whose sum equals the one before
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


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
    compile: bool | str = False,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,), up to ``max_new_tokens`` times or until all rows met eos."""
    from qwen3_lightning.model import check_token_ids

    max_new_tokens = check_decoding_args(temperature, top_k, top_p, max_new_tokens, compile)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, length) with length >= 1; got shape {tuple(input_ids.shape)}. "
            "Start an empty prompt with the <bos> token."
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must match input_ids, "
            f"{tuple(input_ids.shape)} (1 for each prompt token, 0 for the left padding)."
        )
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        rows = torch.nonzero(attention_mask[:, -1] == 0).flatten().tolist()
        raise ValueError(
            f"attention_mask marks the last position of row(s) {rows[:8]} as padding: prompts must be left-padded "
            "(padding first, then the prompt), since each row continues from its last position. "
            "TextDataModule.collate_prompts pads them so."
        )
    check_room(input_ids.shape[1], max_new_tokens, model.config.max_position_embeddings)
    check_token_ids(input_ids, model.config.vocab_size, "the prompts (input_ids)")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: plain causal attention is faster
    if max_new_tokens == 0:
        return iter(())
    step = _compiled_forward(model, compile) if compile else model
    sample = functools.partial(
        sample_next_token, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    capacity = input_ids.shape[1] + max_new_tokens
    if compile:  # a few cache sizes, so that calls with other lengths reuse the compiled graphs
        capacity = min(-(-capacity // CACHE_ROUNDING) * CACHE_ROUNDING, model.config.max_position_embeddings)
    return _decode(model, step, sample, input_ids, max_new_tokens, eos_token_id, attention_mask, capacity)


CACHE_ROUNDING = 256
"""With compile, the cache is allocated in multiples of this many positions."""
COMPILE_CHOICES = (False, True, "max-autotune")
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILE_COUNT = itertools.count()


def _compiled_forward(model: Qwen3Transformer, mode: bool | str) -> Callable[..., torch.Tensor]:
    """The decoding step of ``model`` through ``torch.compile`` in ``mode``: compiled on first use and reused,
    since every step has the same shapes; with frozen weights, compiled again when their values changed."""
    steps = _COMPILED.setdefault(model, {})
    fingerprint = _weights_fingerprint(model) if mode == "max-autotune" else None
    if mode not in steps or steps[mode][0] != fingerprint:
        steps[mode] = (fingerprint, _compile_step(model, frozen=mode == "max-autotune"))
    return steps[mode][1]


def _weights_fingerprint(model: Qwen3Transformer) -> list[tuple[int, float, float]]:
    """Where each weight lives, the XOR of its bits and its sum: not the tensors' version counters, which fused
    optimizer steps and writes through ``.data`` leave unchanged. The sum catches what XOR cancels out (every
    element negated, or a constant tensor changed to another). Costs about one decoding step."""
    fingerprint = []
    for t in (*model.parameters(), *model.buffers()):
        t = t.detach()
        if hasattr(torch, "hash_tensor"):
            bits = torch.hash_tensor(t).view(torch.int64).item()
        else:  # older torch: the sum of squares stands in
            bits = t.double().square().sum().item()
        fingerprint.append((t.data_ptr(), bits, t.sum(dtype=torch.float64).item()))
    return fingerprint


def _compile_step(model: Qwen3Transformer, frozen: bool) -> Callable[..., torch.Tensor]:
    """``frozen``: compile with Inductor's freezing and max-autotune. The weights are folded into the graph as
    constants and prepacked for GEMM kernels picked by timing them: on a CPU, batch-1 decoding runs two to three
    times faster than with plain compilation, whose one-token matmuls leave most of the memory bandwidth unused.
    The price is a first call of tens of seconds (again for each new batch size or cache size), and a graph
    that holds the weights of its time: so it is compiled again when they change, from a new code object,
    because torch.compile keeps its graphs per code object and would otherwise hand the stale one back. Inductor
    keeps the compiled modules it loads, each old graph's copy of the weights included, until the process ends.
    The step holds the model weakly, so that the cache of compiled steps does not keep it alive. Inductor's
    config is process-wide: a compilation in another thread at the same moment would see freezing too."""
    from torch._inductor import config as inductor_config

    code = _step.__code__.replace(co_name=f"decode_step_{next(_COMPILE_COUNT)}")
    fn = types.FunctionType(code, _step.__globals__)
    step = torch.compile(fn, dynamic=False, mode="max-autotune-no-cudagraphs" if frozen else None)
    model_ref = weakref.ref(model)
    # freezing is read while compiling (torch.compile has no option for it); the others keep the timing tables
    # and a deprecation warning from inside Inductor out of the user's terminal
    frozen_config = {"freezing": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}

    def compiled_step(*args: object, **kwargs: object) -> torch.Tensor:
        if not frozen:
            return step(model_ref(), *args, **kwargs)
        with inductor_config.patch(frozen_config), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return step(model_ref(), *args, **kwargs)

    return compiled_step


def _step(model: Qwen3Transformer, *args: object, **kwargs: object) -> torch.Tensor:
    return model(*args, **kwargs)


@torch.no_grad()  # on a generator function, torch keeps grad off at every resumption, streaming included
def _decode(
    model: Qwen3Transformer,
    step: Callable[..., torch.Tensor],
    sample: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    attention_mask: torch.Tensor | None,
    capacity: int,
) -> Iterator[torch.Tensor]:
    from qwen3_lightning.model import KVCache

    B, T = input_ids.shape
    weight = model.model.embed_tokens.weight
    # under autocast (predict with bf16-mixed) keys and values come in the autocast dtype: a cache in it holds
    # them at half the memory, and attention reads it as it is rather than converting it all at every token
    autocast = torch.is_autocast_enabled(weight.device.type)
    dtype = torch.get_autocast_dtype(weight.device.type) if autocast else weight.dtype
    cache = KVCache.allocate(model.config, B, capacity, weight.device, dtype)
    # which cache slots each row may see: the prompt (padding hidden), then each new token once written
    slots = torch.zeros(B, capacity, dtype=torch.long, device=input_ids.device)
    slots[:, :T] = 1 if attention_mask is None else attention_mask
    # left padding: real tokens count their positions from 0, as transformers' generate does
    position_ids = (slots[:, :T].cumsum(-1) - 1).clamp(min=0)
    prompt_mask = None if attention_mask is None else slots[:, :T]
    logits = model(input_ids, attention_mask=prompt_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
    position_ids = position_ids[:, -1:]
    cache.index = torch.tensor([T], device=input_ids.device)  # from here on, every step has the same shapes
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample(logits[:, -1])
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        yield token
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        slots[:, T + i] = 1
        position_ids = position_ids + 1
        logits = step(token[:, None], attention_mask=slots, position_ids=position_ids, cache=cache)
        cache.index += 1


UNKNOWN_TEXT = "\ufffd"
"""How generated text shows an ``<unk>`` token: Unicode's replacement character, not nothing."""


def unknown_characters(tokenizer: CharTokenizer, prompt: str) -> str | None:
    """What to warn of when ``prompt`` has characters the vocabulary lacks; None when it has none."""
    unknown = tokenizer.unknown_chars(prompt)
    return (
        f"the prompt has characters outside the vocabulary, read as <unk>: {''.join(sorted(unknown))!r}"
        if unknown
        else None
    )


def check_room(prompt_tokens: int, max_new_tokens: int, limit: int, prompt: str = "prompt") -> None:
    """Refuses a prompt of ``prompt_tokens`` (its ``<bos>`` included) whose continuation by ``max_new_tokens``
    would pass the model's ``max_position_embeddings`` (``limit``)."""
    if prompt_tokens + max_new_tokens <= limit:
        return
    fix = (
        f"ask for at most {limit - prompt_tokens} new tokens"
        if prompt_tokens < limit
        else f"the prompt alone is too long: shorten it to at most {limit - 2} characters (its <bos> is a token)"
    )
    raise ValueError(
        f"{prompt} ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
        f"max_position_embeddings={limit}; {fix}."
    )


def encode_prompt(tokenizer: CharTokenizer, prompt: str, warn: bool = True) -> list[int]:
    """``<bos>`` followed by the prompt's ids; unknown characters become ``<unk>``, with one warning (``warn``)."""
    message = unknown_characters(tokenizer, prompt) if warn else None
    if message:
        warnings.warn(message, stacklevel=3)
    return [tokenizer.bos_token_id, *tokenizer.encode(prompt)]


def stream_text(
    model: Qwen3Transformer,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = GENERATE_DEFAULTS["temperature"],
    top_k: int | None = GENERATE_DEFAULTS["top_k"],
    top_p: float | None = GENERATE_DEFAULTS["top_p"],
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    warn: bool = True,
) -> Iterator[str]:
    """The continuation of ``prompt``, piece by piece as it is decoded. The arguments are checked (and unknown
    characters warned about, with ``warn``) at the call, before the first piece is asked for."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([encode_prompt(tokenizer, prompt, warn)], device=device)
    tokens = model.generate(
        ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        tokenizer.eos_token_id,
        generator=generator,
        stream=True,
        compile=compile,
    )
    return (tokenizer.decode(token.tolist(), unk=UNKNOWN_TEXT) for token in tokens)
