import pytest
import torch
import transformers

from qwen3_lightning.config import Qwen3Config
from qwen3_lightning.model import KVCache, Qwen3Transformer

# multi-head, GQA 2:1 and 4:1, head_dim unlike hidden/heads, tied and untied, with and without bias
SHAPES = {
    "mha-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa2-untied-bias": dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
        attention_bias=True,
    ),
    "gqa4-wide-heads": dict(
        hidden_size=48,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
    ),
}


def make_config(**fields) -> Qwen3Config:
    base = dict(vocab_size=101, intermediate_size=96, num_decoder_layer=3, max_position_embeddings=128)
    return Qwen3Config(**{**base, **fields})


def reference_pair(config: Qwen3Config, seed: int = 0) -> tuple[torch.nn.Module, Qwen3Transformer]:
    """A random transformers model (norms and biases randomized too) and ours with its weights."""
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_config())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = Qwen3Transformer(config).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("shape", list(SHAPES))
def test_state_dict_keys_equal_transformers(shape):
    config = make_config(**SHAPES[shape])
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_config()))
    ours = Qwen3Transformer(config)
    assert set(ours.state_dict()) == set(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(shape):
    hf, ours = reference_pair(make_config(**SHAPES[shape]))
    x = torch.randint(0, 101, (3, 29))
    with torch.no_grad():
        expected, actual = hf(x).logits, ours(x)
    assert actual.shape == (3, 29, 101)
    assert (expected - actual).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_transformers(shape, side):
    hf, ours = reference_pair(make_config(**SHAPES[shape]))
    x = torch.randint(1, 101, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    for row, pad in enumerate((0, 4, 9)):
        if pad:
            mask[row, :pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, -pad:] = 0
    x = x.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected, actual = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask)
    assert torch.isfinite(actual).all()
    real = mask.bool()
    assert (expected[real] - actual[real]).abs().max() <= 1e-5


def test_padding_does_not_change_real_tokens():
    _, ours = reference_pair(make_config(**SHAPES["gqa2-untied-bias"]))
    x = torch.randint(1, 101, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone, with_pad = ours(x), ours(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(with_pad[:, 5:], alone, atol=1e-5, rtol=0)


def test_causality():
    _, ours = reference_pair(make_config(**SHAPES["gqa4-wide-heads"]))
    x = torch.randint(0, 101, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 101
    with torch.no_grad():
        a, b = ours(x), ours(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cache_equals_full_forward(shape):
    _, ours = reference_pair(make_config(**SHAPES[shape]))
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full = ours(x)
        cache = KVCache.allocate(ours.config, 2, 24, torch.device("cpu"), torch.float32)
        buffers = [k.data_ptr() for k in cache.keys]
        pieces = [ours(x[:, :7], cache=cache)]  # prefill, then one token at a time, then a chunk
        for t in range(7, 15):
            pieces.append(ours(x[:, t : t + 1], cache=cache))
        pieces.append(ours(x[:, 15:], cache=cache))
    assert cache.length == 20
    assert [k.data_ptr() for k in cache.keys] == buffers  # decoding writes into the preallocated buffers
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_cache_overflow_is_refused():
    ours = Qwen3Transformer(make_config())
    cache = KVCache.allocate(ours.config, 1, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_initialization_follows_transformers():
    config = make_config(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        attention_bias=True,
        initializer_range=0.05,
    )
    ours = Qwen3Transformer(config)
    for name, p in ours.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 0.05) < 0.005, name


def test_tied_embedding_is_one_parameter():
    tied = Qwen3Transformer(make_config(tie_word_embeddings=True))
    untied = Qwen3Transformer(make_config(tie_word_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 101 * make_config().hidden_size


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ours = Qwen3Transformer(make_config(**SHAPES["gqa2-untied-bias"]))
    x = torch.randint(0, 101, (2, 12))
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        ours(x).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_checkpointing_runs_each_layer_again_in_the_backward_pass():
    ours = Qwen3Transformer(make_config())
    calls = []

    def counted(forward):
        def run(*args):
            calls.append(forward)
            return forward(*args)

        return run

    for layer in ours.model.layers:  # (forward hooks do not see checkpoint's recomputation: the forward is wrapped)
        layer.forward = counted(layer.forward)
    x = torch.randint(0, 101, (2, 12))
    counts = {}
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        calls.clear()
        ours(x).sum().backward()
        counts[flag] = len(calls)
    layers = len(ours.model.layers)
    assert counts == {False: layers, True: 2 * layers}
    calls.clear()
    with torch.no_grad():
        ours.eval()(x)  # not when evaluating
    assert len(calls) == layers


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bfloat16_logits_match_transformers_in_bfloat16(shape):
    hf, ours = reference_pair(make_config(**SHAPES[shape]))
    x = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        expected, actual = hf.to(torch.bfloat16)(x).logits, ours.to(torch.bfloat16)(x)
    assert actual.dtype == torch.bfloat16
    # a bf16 step at these logits (|logit| < 1) is 2^-8 = 0.0039: at most about two apart, where the two
    # libraries' kernels round differently (each is 0.003-0.005 from float32)
    assert (expected.float() - actual.float()).abs().max() <= 0.008


def test_rms_norm_in_bfloat16_is_computed_in_float32_as_in_qwen3():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from qwen3_lightning.model import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(4, 7, 1024) * 30).bfloat16()  # large values: their squares' mean in bf16 would be off
    reference, ours = Qwen3RMSNorm(1024, eps=1e-6), RMSNorm(1024, eps=1e-6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(reference.weight)
        assert torch.equal(ours.bfloat16()(x), reference.bfloat16()(x))


def test_rotary_angles_stay_float32_when_the_model_is_cast():
    # bf16-true casts the module, FSDP's mixed precision casts its buffers: positions must not move with them
    config = make_config(**SHAPES["mha-tied"])
    positions = torch.arange(1000, 1010)[None]
    exact = Qwen3Transformer(config).model.rotary_emb(positions, torch.float32)
    rotary = Qwen3Transformer(config).to(torch.bfloat16).model.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    for ours, reference in zip(rotary(positions, torch.float32), exact, strict=True):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_token_equals_what_torch_counts_in_a_transformers_training_step(shape):
    # the count behind MFU, checked against torch's FLOP counter on the reference model's forward and backward;
    # the math attention kernel, whose matmuls the counter sees (the CPU flash kernel has no FLOP formula)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qwen3_lightning.model import flops_per_token

    config = make_config(**SHAPES[shape])
    hf, _ = reference_pair(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 40))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        hf(input_ids).logits.sum().backward()
    assert counter.get_total_flops() == flops_per_token(config, 40) * 2 * 40
