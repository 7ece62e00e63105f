import json
import math
import re
from pathlib import Path

import pytest

from qwen3_lightning.config import PRESETS, Qwen3Config

# Target sizes at vocab_size 1000 (the foundation issue); the published shapes are checked field by field.
TARGET_PARAMS = {"tiny": 1.5e6, "small": 6e6, "medium": 24e6, "large": 96e6}


@pytest.mark.parametrize("name", list(TARGET_PARAMS))
def test_preset_parameter_counts(name):
    import torch

    from qwen3_lightning.model import Qwen3Transformer

    with torch.device("meta"):
        n = Qwen3Transformer(Qwen3Config.from_preset(name, vocab_size=1000)).num_parameters()
    assert abs(n - TARGET_PARAMS[name]) / TARGET_PARAMS[name] <= 0.25, n


def preset_table(readme: Path) -> dict[str, tuple[int, ...]]:
    """The README's preset table: name -> (hidden, layers, heads, kv heads, head_dim, MLP, parameters in 10K)."""
    row = re.compile(r"^\| `([\w.-]+)` \| (\d+) \| (\d+) \| (\d+) / (\d+) \| (\d+) \| (\d+) \| ([\d.]+)M \|$", re.M)
    return {m[1]: (*map(int, m.groups()[1:7]), round(float(m[8]) * 100)) for m in row.finditer(readme.read_text())}


@pytest.mark.parametrize("readme", ["README.md", "README.zh-CN.md"])
def test_the_readmes_preset_table_is_the_presets_and_their_sizes_in_transformers(readme):
    import torch
    import transformers

    from qwen3_lightning.model import Qwen3Transformer

    table = preset_table(Path(__file__).resolve().parents[1] / readme)
    assert set(table) == set(PRESETS)
    for name, (hidden, layers, heads, kv_heads, head_dim, mlp, size) in table.items():
        c = Qwen3Config.from_preset(name, vocab_size=1000)
        shape = (c.hidden_size, c.num_decoder_layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        assert (*shape, c.intermediate_size) == (hidden, layers, heads, kv_heads, head_dim, mlp), name
        with torch.device("meta"):  # counted by transformers' model of the same config, to 0.01M
            n = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**c.to_hf_config())).num_parameters()
            assert Qwen3Transformer(c).num_parameters() == n, name
        assert round(n / 1e4) == size, (name, n)


@pytest.mark.parametrize(("name", "hidden", "inter"), [("qwen3-0.6b", 1024, 3072), ("qwen3-1.7b", 2048, 6144)])
def test_published_shapes(name, hidden, inter):
    c = Qwen3Config.from_preset(name, vocab_size=5000)
    assert (c.hidden_size, c.intermediate_size, c.num_decoder_layer) == (hidden, inter, 28)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (16, 8, 128)
    assert c.tie_word_embeddings and c.rope_theta == 1e6 and c.vocab_size == 5000


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'") as err:
        Qwen3Config.from_preset("huge")
    for name in PRESETS:
        assert name in str(err.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="num_layers"):
        Qwen3Config.from_preset("tiny", num_layers=3)


def test_overrides_replace_preset_fields():
    c = Qwen3Config.from_preset("small", num_decoder_layer=3, attention_bias=True)
    assert c.num_decoder_layer == 3 and c.attention_bias and c.hidden_size == PRESETS["small"]["hidden_size"]


def test_for_vocabulary_takes_the_datas_size_over_an_overrides_vocab_size():
    c = Qwen3Config.for_vocabulary("tiny", {"vocab_size": 99, "num_decoder_layer": 2}, vocab_size=1234)
    assert (c.vocab_size, c.num_decoder_layer) == (1234, 2)
    assert Qwen3Config.for_vocabulary("tiny", None, 77) == Qwen3Config.from_preset("tiny", vocab_size=77)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"num_attention_heads": 6, "num_key_value_heads": 4},
            "num_attention_heads=6 is not divisible by num_key_value_heads=4",
        ),
        ({"head_dim": 31}, "head_dim=31 must be even"),
        ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size=-5"),
        ({"num_decoder_layer": 2.5}, "num_decoder_layer=2.5"),
        ({"rope_theta": 0.0}, "rope_theta=0.0 must be a positive number"),
        ({"rope_theta": "abc"}, "rope_theta='abc' must be a positive number"),
        ({"rope_theta": None}, "rope_theta=None must be a positive number"),
        ({"rope_theta": float("nan")}, "rope_theta=nan"),
        ({"hidden_size": "128"}, "hidden_size='128' must be a positive integer"),
        ({"hidden_size": True}, "hidden_size=True must be a positive integer"),
        ({"attention_bias": "false"}, "attention_bias='false' must be true or false, not a str"),
        ({"tie_word_embeddings": 0}, "tie_word_embeddings=0 must be true or false"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
        ({"initializer_range": 0}, "initializer_range"),
        ({"max_position_embeddings": 0}, "max_position_embeddings=0"),
    ],
)
def test_impossible_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Qwen3Config(**fields)


def test_numpy_numbers_are_taken_as_python_ones():
    import numpy as np

    c = Qwen3Config(hidden_size=np.int64(64), rope_theta=np.float32(5e5), attention_bias=np.bool_(True))
    assert c == Qwen3Config(hidden_size=64, rope_theta=5e5, attention_bias=True)
    assert type(c.hidden_size) is int and type(c.rope_theta) is float and type(c.attention_bias) is bool


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    c = Qwen3Config.from_preset(name, vocab_size=777, attention_bias=True, rope_theta=5e5)
    d = json.loads(json.dumps(c.to_hf_config()))
    assert Qwen3Config.from_hf_config(d) == c


def test_hf_config_reads_rope_theta_from_either_place():
    d = Qwen3Config.from_preset("tiny").to_hf_config()
    old = {k: v for k, v in d.items() if k != "rope_parameters"} | {"rope_theta": 12345.0}
    new = {k: v for k, v in d.items() if k != "rope_theta"} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}
    }
    assert Qwen3Config.from_hf_config(old).rope_theta == 12345.0
    assert Qwen3Config.from_hf_config(new).rope_theta == 777.0


def test_hf_config_with_an_older_rope_scaling_is_refused():
    # older config.json files name the rope kind "type"; transformers reads it as rope_type and scales positions
    d = {k: v for k, v in Qwen3Config.from_preset("tiny").to_hf_config().items() if k != "rope_parameters"}
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type='linear' is not supported; only the default rotary embedding"):
        Qwen3Config.from_hf_config(d)
    d["rope_scaling"] = {"type": "default"}
    assert Qwen3Config.from_hf_config(d).rope_theta == Qwen3Config.from_preset("tiny").rope_theta


def test_hf_config_is_accepted_by_transformers():
    import transformers

    c = Qwen3Config.from_preset("small", vocab_size=321, rope_theta=2e5)
    hf = transformers.Qwen3Config(**c.to_hf_config())
    assert (hf.num_hidden_layers, hf.head_dim, hf.vocab_size) == (c.num_decoder_layer, c.head_dim, 321)
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert math.isclose(theta, 2e5)
    assert Qwen3Config.from_hf_config(hf.to_dict()) == c


@pytest.mark.parametrize("given", [{"num_key_value_heads": 2}, {"num_attention_heads": 32}])
def test_hf_config_fields_left_out_take_transformers_defaults(given):
    # a hand-written config.json: the fields that shape the weights, and not tie_word_embeddings, head_dim,
    # rope_theta or max_position_embeddings, where transformers' defaults are not a reader's guess
    import transformers

    d = {"model_type": "qwen3", "vocab_size": 99, "hidden_size": 64, "intermediate_size": 96}
    d |= {"num_hidden_layers": 2, "num_attention_heads": 4, **given}
    hf = transformers.Qwen3Config(**d)
    c = Qwen3Config.from_hf_config(d)
    theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    ours = (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings, c.max_position_embeddings, c.rope_theta)
    assert ours == (hf.head_dim, hf.num_key_value_heads, hf.tie_word_embeddings, hf.max_position_embeddings, theta)


def test_hf_config_sliding_window_reads_as_transformers_does():
    import transformers

    d = Qwen3Config.from_preset("tiny").to_hf_config() | {"use_sliding_window": True}
    for fields in ({}, {"max_window_layers": 1}):  # transformers: max_window_layers 28, sliding_window 4096
        layers = transformers.Qwen3Config(**d | fields).layer_types
        if "sliding_attention" in layers:
            with pytest.raises(ValueError, match="sliding-window attention"):
                Qwen3Config.from_hf_config(d | fields)
        else:
            assert Qwen3Config.from_hf_config(d | fields).num_decoder_layer == len(layers)
    assert "sliding_attention" in transformers.Qwen3Config(**d | {"max_window_layers": 1}).layer_types


def test_other_model_types_are_refused():
    with pytest.raises(ValueError, match="model_type='llama'"):
        Qwen3Config.from_hf_config({"model_type": "llama"})


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, qwen3_lightning.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
