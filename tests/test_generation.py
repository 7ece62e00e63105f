import dataclasses
import functools
import gc
import weakref

import pytest
import torch
import transformers

from qwen3_lightning.config import Qwen3Config
from qwen3_lightning.generation import NUCLEUS_CANDIDATES, check_generate_kwargs, draw, sample_next_token, stream_text
from qwen3_lightning.model import Qwen3Transformer
from qwen3_lightning.tokenizer import CharTokenizer

CONFIG = Qwen3Config(
    vocab_size=83,
    hidden_size=64,
    intermediate_size=128,
    num_decoder_layer=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    # larger weights than the default init, so that greedy decoding does not repeat one token forever
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**CONFIG.to_hf_config(), "initializer_range": 0.2}))
    hf.eval()
    ours = Qwen3Transformer(CONFIG).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(4, 83, (1, 7))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=30,
        min_new_tokens=30,
        do_sample=False,
        pad_token_id=0,
    )
    actual = ours.generate(prompt, 30, temperature=0)
    assert len(set(actual[0, 7:].tolist())) > 3  # a real sequence, not one repeated token
    assert torch.equal(actual, expected)


def test_left_padded_batch_equals_transformers(pair):
    hf, ours = pair
    prompts = [torch.randint(4, 83, (n,)) for n in (3, 9, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p) :], mask[i, 9 - len(p) :] = p, 1
    expected = hf.generate(
        ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
    )
    actual = ours.generate(ids, 20, temperature=0, attention_mask=mask)
    assert torch.equal(actual, expected)
    for i, p in enumerate(prompts):  # and each row as if it were alone
        alone = ours.generate(p[None], 20, temperature=0)
        assert torch.equal(alone[0, len(p) :], actual[i, 9:])


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    prompt = torch.randint(4, 83, (2, 5))

    def run(seed):
        return ours.generate(prompt, 25, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_one_and_tiny_top_p_are_greedy(pair):
    _, ours = pair
    prompt = torch.randint(4, 83, (1, 5))
    greedy = ours.generate(prompt, 15, temperature=0)
    assert torch.equal(ours.generate(prompt, 15, temperature=1.5, top_k=1), greedy)
    assert torch.equal(ours.generate(prompt, 15, temperature=1.5, top_p=1e-6), greedy)
    # a temperature so small that logits / temperature overflows: still the greedy tokens, not NaN
    assert torch.equal(ours.generate(prompt, 15, temperature=1e-45), greedy)
    assert torch.equal(ours.generate(prompt, 15, temperature=1e-300), greedy)  # 0 as a float32


def test_temperature_divides_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        draws = torch.stack([sample_next_token(logits, temperature, generator=gen) for _ in range(6000)])[:, 0]
        counts = torch.bincount(draws, minlength=4).float() / len(draws)
        # softmax([4, 2, 0, -2]) = 0.87, 0.12, 0.02, 0.00 at 0.5; softmax([1, .5, 0, -.5]) = .41, .25, .15, .09 at 2
        torch.testing.assert_close(counts, (logits / temperature).softmax(-1)[0], atol=0.02, rtol=0)


def filtered_distribution(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """What sample_next_token should draw from, computed the plain way: the whole vocabulary sorted, in float64."""
    order = logits.double().argsort(descending=True)
    probs = (logits.double()[order] / temperature).softmax(-1)
    if top_k is not None:
        probs[top_k:] = 0
        probs /= probs.sum()
    if top_p is not None:
        probs[probs.cumsum(-1) - probs >= top_p] = 0
        probs /= probs.sum()
    return torch.zeros_like(probs).scatter(0, order, probs)


@pytest.mark.parametrize(
    ("spread", "temperature", "top_k", "top_p"),
    [
        (None, 1.0, None, None),  # None: peaked logits, randn * 3
        (None, 0.7, 20, None),
        (None, 3.0, 20, 0.6),
        (None, 1.0, None, 0.5),
        (1.5, 1.0, None, 0.35),  # a nucleus of about 210 tokens, among NUCLEUS_CANDIDATES that hold 41% of the mass
        (3.0, 1.0, None, 0.9),  # one of several hundred tokens, past them: the whole vocabulary is sorted
    ],
)
def test_sampling_draws_from_the_filtered_softmax(spread, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    if spread is None:
        logits = torch.randn(1000, generator=g) * 3
    else:  # evenly spread from 0 down to -spread, in a random order
        logits = torch.linspace(0, -spread, 1000)[torch.randperm(1000, generator=g)]
    expected = filtered_distribution(logits, temperature, top_k, top_p)
    if spread == 3.0:
        assert (expected > 0).sum() > NUCLEUS_CANDIDATES
    rows = logits.expand(256, -1)
    draws = torch.cat([sample_next_token(rows, temperature, top_k, top_p, generator=g) for _ in range(200)])
    counts = torch.bincount(draws, minlength=1000).double() / len(draws)
    assert bool((expected[draws] > 0).all())  # never a token the filters drop
    # total variation distance; sampling noise over 51,200 draws leaves about 0.05 in the last case
    assert 0.5 * (counts - expected).abs().sum().item() < 0.08


def test_draw_never_picks_a_column_of_probability_zero_at_either_end_of_the_uniform_range(monkeypatch):
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]])
    for u in (0.0, 1 - 2**-53):  # torch.rand's smallest and largest float64 values
        monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kwargs: torch.full(*shape, u, dtype=kwargs["dtype"]))
        picked = draw(probs).tolist()
        assert picked == ([1, 0] if u == 0 else [3, 4])


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_logits_with_nothing_to_sample_from_are_refused_with_the_rows(top_k):
    logits = torch.zeros(3, 10)
    logits[1] = float("nan")
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match=r"nothing to sample from in row\(s\) \[1, 2\]: their logits are NaN"):
        sample_next_token(logits, 0.8, top_k=top_k, generator=torch.Generator().manual_seed(0))


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_k=2, generator=gen).item() for _ in range(300)}
    assert draws == {0, 1}
    # softmax of [4, 3, 2, ...]: 0.64, 0.24, 0.09, ... the nucleus of 0.8 is the first two tokens
    draws = {sample_next_token(logits, 1.0, top_p=0.8, generator=gen).item() for _ in range(300)}
    assert draws == {0, 1}
    counts = (
        torch.bincount(
            torch.stack([sample_next_token(logits, 1.0, generator=gen) for _ in range(4000)])[:, 0], minlength=5
        ).float()
        / 4000
    )
    torch.testing.assert_close(counts, logits.softmax(-1)[0], atol=0.03, rtol=0)


def test_eos_stops_and_pads(pair):
    _, ours = pair
    prompt = torch.randint(4, 83, (1, 5))
    greedy = ours.generate(prompt, 20, temperature=0)[0, 5:]
    eos = int(greedy[3])
    stopped = ours.generate(prompt, 20, temperature=0, eos_token_id=eos)[0, 5:]
    first = greedy.tolist().index(eos)
    assert stopped.tolist() == greedy[: first + 1].tolist()


def test_rows_that_met_eos_are_padded_with_it_while_the_others_go_on(pair):
    _, ours = pair
    torch.manual_seed(3)
    prompts = torch.randint(4, 83, (2, 5))
    greedy = ours.generate(prompts, 20, temperature=0)[:, 5:]
    # a token that the first row makes early and the second row never makes
    eos = next(int(t) for t in greedy[0, :8] if int(t) not in greedy[1].tolist())
    first = greedy[0].tolist().index(eos)
    out = ours.generate(prompts, 20, temperature=0, eos_token_id=eos)[:, 5:]
    assert out.shape == (2, 20)  # the second row never ends: every step is taken
    assert out[0, : first + 1].tolist() == greedy[0, : first + 1].tolist()
    assert out[0, first:].tolist() == [eos] * (20 - first)  # padded with eos after it, not its greedy tokens
    assert greedy[0, first + 1 :].ne(eos).any()  # (which would differ)
    assert torch.equal(out[1], greedy[1])


def test_stream_yields_the_same_tokens(pair):
    _, ours = pair
    prompt = torch.randint(4, 83, (2, 4))
    streamed = torch.stack(list(ours.generate(prompt, 12, temperature=0, stream=True)), dim=1)
    assert torch.equal(streamed, ours.generate(prompt, 12, temperature=0)[:, 4:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature=-0.5 must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature=inf must be a finite number"),
        ({"attention_mask": torch.ones(1, 4, dtype=torch.long)}, r"attention_mask has shape \(1, 4\); it must match"),
        (
            {"attention_mask": torch.tensor([[1, 1, 1, 0, 0]])},
            r"marks the last position of row\(s\) \[0\] as padding: prompts must be left-padded",
        ),
        ({"temperature": "0.8"}, "temperature='0.8' must be a finite number"),
        ({"top_k": 0}, "top_k=0"),
        ({"top_k": 2.5}, "top_k=2.5 must be a positive whole number"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_p": "0.9"}, "top_p='0.9' must be a number in"),
        ({"max_new_tokens": 60}, "exceeds the model's max_position_embeddings=64"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1 must be a whole number >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens=2.5 must be a whole number"),
        ({"compile": "yes"}, r"compile='yes': choose False, True \(torch.compile\) or 'max-autotune'"),
    ],
)
def test_bad_generation_arguments(pair, kwargs, message):
    _, ours = pair
    args = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.generate(torch.ones(1, 5, dtype=torch.long), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0}, r"model.generate_kwargs: top_p=0 must be a number in \(0, 1\]"),
        ({"top_k": 2.5}, "model.generate_kwargs: top_k=2.5 must be a positive whole number"),
        ({"max_new_tokens": "5"}, "model.generate_kwargs: max_new_tokens='5' must be a whole number"),
        ({"compile": "fast"}, "model.generate_kwargs: compile='fast': choose .*in YAML and on the command line"),
    ],
)
def test_generate_kwargs_are_checked_with_the_same_words_as_generate(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_generate_kwargs(kwargs)
    assert check_generate_kwargs({"temperature": 0})["temperature"] == 0


def test_max_new_tokens_may_be_a_numpy_or_tensor_integer(pair):
    import numpy as np

    _, ours = pair
    prompt = torch.randint(4, 83, (1, 5))
    expected = ours.generate(prompt, 4, temperature=0)
    for n in (np.int64(4), torch.tensor(4)):
        assert torch.equal(ours.generate(prompt, n, temperature=0), expected)
    # and so may the sampling settings
    g = torch.Generator().manual_seed(0)
    sampled = ours.generate(prompt, 4, temperature=0.7, top_k=5, top_p=0.9, generator=g)
    for k, t, p in ((np.int64(5), np.float32(0.7), np.float64(0.9)), (torch.tensor(5), torch.tensor(0.7), 0.9)):
        g.manual_seed(0)
        assert torch.equal(ours.generate(prompt, 4, temperature=t, top_k=k, top_p=p, generator=g), sampled)


def test_empty_input_is_refused(pair):
    with pytest.raises(ValueError, match="Start an empty prompt with the <bos> token"):
        pair[1].generate(torch.ones(1, 0, dtype=torch.long), 5)


def test_stream_text_warns_once_on_unknown_characters(pair):
    _, ours = pair
    tokenizer = CharTokenizer().build_vocab(["".join(chr(0x4E00 + i) for i in range(79))])
    assert tokenizer.vocab_size == 83
    with pytest.warns(UserWarning, match="outside the vocabulary") as record:
        text = "".join(stream_text(ours, tokenizer, "一丁X", 10, temperature=0))
    assert len(record) == 1 and "X" in str(record[0].message)
    assert 0 < len(text) <= 10
    empty = "".join(stream_text(ours, tokenizer, "", 10, temperature=0))  # starts from <bos> alone
    assert 0 < len(empty) <= 10


def test_compiled_decoding_equals_eager(pair):
    _, ours = pair
    prompts = torch.randint(4, 83, (2, 6))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    eager = ours.generate(prompts, 12, temperature=0, attention_mask=mask)
    compiled = ours.generate(prompts, 12, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(compiled, eager)
    again = ours.generate(prompts, 20, temperature=0, attention_mask=mask, compile=True)  # reuses the graph
    assert torch.equal(again[:, :18], eager)


def fused_adamw_step(model: Qwen3Transformer) -> None:
    # fused AdamW writes the weights without bumping their version counters
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(torch.tensor([[5, 6, 7, 8]])).logsumexp(-1).sum().backward()
    optimizer.step()


def scale_through_data(model: Qwen3Transformer) -> None:
    model.lm_head.weight.data.mul_(-1.0)  # tied to the embedding: both change; .data writes bump no version


def test_max_autotune_decoding_equals_eager_and_follows_weight_changes():
    # freezing folds the weights into the graph: after they change it must compile again, not reuse them
    torch.manual_seed(0)
    model = Qwen3Transformer(dataclasses.replace(CONFIG, initializer_range=0.2)).eval()
    prompts = torch.randint(4, 83, (2, 5))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    before = model.generate(prompts, 8, temperature=0, attention_mask=mask)
    assert torch.equal(model.generate(prompts, 8, temperature=0, attention_mask=mask, compile="max-autotune"), before)
    for change in (fused_adamw_step, scale_through_data):
        change(model)
        eager = model.generate(prompts, 8, temperature=0, attention_mask=mask)
        assert not torch.equal(eager, before), change.__name__
        compiled = model.generate(prompts, 8, temperature=0, attention_mask=mask, compile="max-autotune")
        assert torch.equal(compiled, eager), change.__name__
        before = eager


@pytest.mark.parametrize("mode", [True, "max-autotune"])
def test_compiled_steps_do_not_keep_the_model_alive(mode):
    model = Qwen3Transformer(CONFIG).eval()
    model.generate(torch.tensor([[5, 6]]), 3, temperature=0, compile=mode)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("hash_tensor", [True, False])
def test_each_compile_mode_is_compiled_once_per_weights(monkeypatch, hash_tensor):
    from qwen3_lightning import generation

    if not hash_tensor:  # older torch
        monkeypatch.delattr(torch, "hash_tensor", raising=False)

    compiled = []

    def fake_compile(model, frozen):  # counts compilations; the step itself runs eagerly
        compiled.append(frozen)
        return functools.partial(generation._step, model)

    monkeypatch.setattr(generation, "_compile_step", fake_compile)
    model = Qwen3Transformer(CONFIG).eval()
    prompt = torch.tensor([[5, 6, 7]])
    for mode in (True, "max-autotune", True, "max-autotune", False):
        model.generate(prompt, 3, temperature=0, compile=mode)
    assert compiled == [False, True]  # alternating modes reuses both graphs
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.generate(prompt, 3, temperature=0, compile=True)  # plain graphs read the weights at every call
    model.generate(prompt, 3, temperature=0, compile="max-autotune")  # frozen ones hold old weights: recompiled
    assert compiled == [False, True, True]


def test_unknown_compile_mode_is_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="compile='fast'"):
        ours.generate(torch.tensor([[5, 6]]), 4, compile="fast")


def test_streaming_builds_no_autograd_graph(pair, monkeypatch):
    _, ours = pair
    grad_modes = []
    forward = ours.forward

    def spy(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(ours, "forward", spy)
    for _ in ours.generate(torch.randint(4, 83, (1, 4)), 3, temperature=0, stream=True):
        assert torch.is_grad_enabled()  # the caller's mode is untouched between steps
    assert grad_modes == [False, False, False]  # prefill and two steps, all without autograd


def test_generation_under_bf16_autocast(pair, monkeypatch):
    # as in `predict` with trainer.precision bf16-mixed: float32 weights, bfloat16 activations and cache (as
    # transformers' cache holds them: in the dtype they come in)
    from qwen3_lightning.model import KVCache

    caches = []
    allocate = KVCache.allocate
    monkeypatch.setattr(KVCache, "allocate", lambda *a, **k: caches.append(allocate(*a, **k)) or caches[-1])
    hf, ours = pair
    torch.manual_seed(5)
    prompts = torch.randint(4, 83, (2, 5))
    mask = torch.ones_like(prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = ours.generate(prompts, 12, temperature=0, attention_mask=mask)
        logits = hf(out).logits[:, 4:-1].float()  # transformers' logits for each new token, from its prefix
    assert {t.dtype for c in caches for t in (*c.keys, *c.values)} == {torch.bfloat16}
    assert ours.model.embed_tokens.weight.dtype == torch.float32
    assert len(set(out[:, 5:].flatten().tolist())) > 3
    # each new token is transformers' greedy choice on the same prefix. bfloat16 logits tie now and then (two
    # equal to all 8 bits), and a tie may go either way: within one bfloat16 step of the largest counts as its
    # choice (on an AVX512-BF16 CPU, transformers' own generate, through its cache, took the other token of a tie)
    best = logits.max(-1).values
    chosen = logits.gather(-1, out[:, 5:, None]).squeeze(-1)
    step = 2.0 ** (torch.floor(torch.log2(best.abs())) - 7)
    assert bool((best - chosen <= step).all()), (best - chosen, step)
    assert (best - chosen > 0).float().mean() < 0.2  # ties are rare: most tokens are the one largest logit


def test_every_way_to_sample_text_starts_from_the_same_settings(tmp_path):
    # the generate command, the samples during training, stream_text and an export's generation_config: what
    # predict's generate_kwargs start from
    import inspect
    import json

    from qwen3_lightning.callbacks import TextSampler
    from qwen3_lightning.cli import generate
    from qwen3_lightning.generation import GENERATE_DEFAULTS
    from qwen3_lightning.interop import export_pretrained

    expected = {"temperature": 0.8, "top_k": 50}
    assert {k: GENERATE_DEFAULTS[k] for k in expected} == expected
    for function in (generate, TextSampler.__init__, stream_text):
        parameters = inspect.signature(function).parameters
        assert {k: parameters[k].default for k in expected} == expected, function.__qualname__
    export_pretrained(Qwen3Transformer(Qwen3Config.from_preset("tiny", vocab_size=16)), tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert {k: exported[k] for k in expected} == expected
