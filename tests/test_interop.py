import json
import re

import pytest
import torch
import transformers

from qwen3_lightning.config import Qwen3Config
from qwen3_lightning.interop import export_pretrained, load_checkpoint
from qwen3_lightning.model import Qwen3Transformer
from qwen3_lightning.tokenizer import CharTokenizer

TEXT = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。 Hello, world! 𠀀😀"


def small_config(**fields) -> Qwen3Config:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_decoder_layer=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    return Qwen3Config(**{**base, **fields})


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tied):
    tokenizer = CharTokenizer().build_vocab([TEXT])
    torch.manual_seed(0)
    ours = Qwen3Transformer(small_config(vocab_size=tokenizer.vocab_size, tie_word_embeddings=tied)).eval()
    export_pretrained(ours, tmp_path, tokenizer)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "vocab.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = torch.tensor([tokenizer.encode(TEXT, add_special_tokens=True)])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied


def test_exported_tokenizer_encodes_like_char_tokenizer(tmp_path):
    tokenizer = CharTokenizer().build_vocab([TEXT])
    export_pretrained(Qwen3Transformer(small_config(vocab_size=tokenizer.vocab_size)), tmp_path, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # the special tokens' names in text are characters, as CharTokenizer reads them (not the tokens themselves)
    for text in (TEXT, "明月 unknown 字 \n\n  end", "", "  两个空格", "明<eos>月<pad><bos>"):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    # by default <bos> first, as the model was trained; and it decodes away
    assert hf_tok(TEXT)["input_ids"] == [tokenizer.bos_token_id, *tokenizer.encode(TEXT)]
    assert hf_tok.decode(hf_tok(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    ids = tokenizer.encode(TEXT)
    assert hf_tok.decode(ids) == tokenizer.decode(ids) == TEXT
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize(
    "model",
    [
        {"type": "WordLevel", "vocab": {"<pad>": None, "<unk>": 1}},
        {"type": "WordLevel", "vocab": {"a": "0", "b": 1}},
        "WordLevel",
    ],
)
def test_exported_tokenizer_refuses_a_malformed_vocabulary_by_name(tmp_path, model):
    # ids that are not whole numbers (null, a string among numbers) or a "model" that is not an object: the
    # ValueError that names the file, not sorted()'s TypeError or an AttributeError
    from qwen3_lightning.interop import exported_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a character vocabulary written by export"):
        exported_tokenizer(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_from_pretrained_reads_a_transformers_directory(tmp_path, tied):
    config = small_config(tie_word_embeddings=tied, attention_bias=True)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_config())).eval()
    hf.save_pretrained(tmp_path)
    ours = Qwen3Transformer.from_pretrained(tmp_path).eval()
    assert ours.config == config
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding-window attention"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
            "rope_type='linear' is not supported; only the default rotary embedding",
        ),
    ],
)
def test_from_pretrained_refuses_settings_it_would_compute_otherwise(tmp_path, field, message):
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**small_config().to_hf_config(), **field}))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        Qwen3Transformer.from_pretrained(tmp_path)


def test_from_pretrained_reads_every_shard_of_a_sharded_directory(tmp_path):
    torch.manual_seed(3)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small_config(num_decoder_layer=4).to_hf_config()))
    hf.eval().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = Qwen3Transformer.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-5


def test_export_over_a_sharded_export_leaves_only_its_own_weights(tmp_path):
    torch.manual_seed(2)
    bigger = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small_config(num_decoder_layer=4).to_hf_config()))
    bigger.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Qwen3Transformer(small_config()).eval()
    export_pretrained(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    back = Qwen3Transformer.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values(), strict=True))


def test_round_trip_through_export(tmp_path):
    torch.manual_seed(2)
    ours = Qwen3Transformer(small_config(tie_word_embeddings=False))
    export_pretrained(ours, tmp_path)
    back = Qwen3Transformer.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_in_bfloat16(tmp_path):
    export_pretrained(Qwen3Transformer(small_config()), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Qwen3Transformer.from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        Qwen3Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_hf_config()))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        Qwen3Transformer.from_pretrained(tmp_path)
    other = tmp_path / "other"
    export_pretrained(Qwen3Transformer(small_config(num_decoder_layer=1)), other)
    (other / "config.json").write_text(json.dumps(small_config().to_hf_config()))  # claims 2 layers
    with pytest.raises(ValueError, match="do not fit"):
        Qwen3Transformer.from_pretrained(other)
    # a hand-written config.json of a tied model that leaves the field out: transformers reads it as untied
    tied = tmp_path / "tied"
    export_pretrained(Qwen3Transformer(small_config(tie_word_embeddings=True)), tied)
    config = {k: v for k, v in json.loads((tied / "config.json").read_text()).items() if k != "tie_word_embeddings"}
    (tied / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\].* leaves out tie_word_embeddings"):
        Qwen3Transformer.from_pretrained(tied)
    (tied / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"config.json has no hidden_size"):
        Qwen3Transformer.from_pretrained(tied)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="not a checkpoint of a qwen3_lightning training run"):
        load_checkpoint(other)


def test_export_refuses_what_is_not_a_qwen3_transformer(tmp_path):
    from qwen3_lightning.module import Qwen3LightningModule

    module = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=64)
    module.configure_model()
    with pytest.raises(ValueError, match=r"got a Qwen3LightningModule.*pass module\.model"):
        export_pretrained(module, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    export_pretrained(module.model, tmp_path / "out")


def test_export_refuses_a_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    tokenizer = CharTokenizer().build_vocab([TEXT])
    small = Qwen3Transformer(small_config(vocab_size=tokenizer.vocab_size - 1))
    with pytest.raises(ValueError, match=rf"{tokenizer.vocab_size} tokens.*vocab_size is {tokenizer.vocab_size - 1}"):
        export_pretrained(small, tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()
    padded = Qwen3Transformer(small_config(vocab_size=tokenizer.vocab_size + 7))  # a padded vocabulary is normal
    export_pretrained(padded, tmp_path / "out", tokenizer)
    assert Qwen3Transformer.from_pretrained(tmp_path / "out").config.vocab_size == tokenizer.vocab_size + 7


def test_export_refuses_an_out_dir_that_is_or_is_under_a_file(tmp_path):
    model = Qwen3Transformer(small_config())
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt is a file"):
        export_pretrained(model, file)
    with pytest.raises(ValueError, match=r"notes\.txt/sub is under .*notes\.txt, which is a file"):
        export_pretrained(model, file / "sub")
    assert file.read_text() == "keep me"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"vocab_size": 64,\n "hidden_size": 32,,}', r"config\.json is not valid JSON \(.*line 2 column"),
        ("[1, 2]", r"config\.json holds a list, not a JSON object"),
    ],
)
def test_from_pretrained_refuses_a_config_json_that_is_no_object(tmp_path, text, message):
    export_pretrained(Qwen3Transformer(small_config()), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        Qwen3Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "tensor", "stored", "wanted"),
    [
        ({"hidden_size": 48}, "model.embed_tokens.weight", (64, 32), (64, 48)),
        ({"vocab_size": 80}, "model.embed_tokens.weight", (64, 32), (80, 32)),
        ({"intermediate_size": 96}, "model.layers.0.mlp.gate_proj.weight", (64, 32), (96, 32)),
    ],
)
def test_from_pretrained_refuses_a_config_json_that_disagrees_with_the_weights(tmp_path, field, tensor, stored, wanted):
    export_pretrained(Qwen3Transformer(small_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **field}))
    message = (
        f"config.json and the weights disagree: {tensor} is {stored} in {tmp_path / 'model.safetensors'} but {wanted}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        Qwen3Transformer.from_pretrained(tmp_path)


def test_from_pretrained_names_a_truncated_safetensors_file(tmp_path):
    export_pretrained(Qwen3Transformer(small_config()), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for size in (20, len(data) // 2):
        weights.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"model\.safetensors is truncated or not a safetensors file"):
            Qwen3Transformer.from_pretrained(tmp_path)


def test_from_pretrained_takes_dtype_names(tmp_path):
    export_pretrained(Qwen3Transformer(small_config()), tmp_path)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        assert Qwen3Transformer.from_pretrained(tmp_path, dtype=name).lm_head.weight.dtype == dtype
    assert Qwen3Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    # "auto", as in transformers: the dtype the weights are stored in
    export_pretrained(Qwen3Transformer(small_config()), tmp_path / "bf16", dtype="bfloat16")
    assert Qwen3Transformer.from_pretrained(tmp_path / "bf16", dtype="auto").lm_head.weight.dtype == torch.bfloat16
    assert Qwen3Transformer.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
    for bad in ("fp16", "int8", torch.int64):
        with pytest.raises(ValueError, match=r"dtype=.* is not one of float32, bfloat16, float16"):
            Qwen3Transformer.from_pretrained(tmp_path, dtype=bad)


def test_from_pretrained_explains_a_checkpoint_or_a_hub_id(tmp_path, monkeypatch):
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(
        ValueError, match=r"best\.ckpt is a training checkpoint.*Qwen3LightningModule\.load_from_checkpoint.*export"
    ):
        Qwen3Transformer.from_pretrained(ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"Qwen/Qwen3-0\.6B does not exist: there is no such folder in .*, and if it is a Hugging Face hub id, "
        r"nothing is downloaded here.*huggingface-cli download",
    ):
        Qwen3Transformer.from_pretrained("Qwen/Qwen3-0.6B")
    with pytest.raises(FileNotFoundError, match=r"missing_dir does not exist"):
        Qwen3Transformer.from_pretrained(tmp_path / "missing_dir")
    (tmp_path / "runs").mkdir()  # a missing folder inside a local one is no hub id
    with pytest.raises(FileNotFoundError, match=r"runs/tiny does not exist; give a transformers model directory"):
        Qwen3Transformer.from_pretrained("runs/tiny")


def test_from_pretrained_tells_a_zipped_export_from_a_checkpoint(tmp_path):
    import shutil

    out = export_pretrained(Qwen3Transformer(Qwen3Config.from_preset("tiny", vocab_size=40)), tmp_path / "exp")
    archive = shutil.make_archive(str(tmp_path / "exp_zip"), "zip", out)
    with pytest.raises(ValueError, match=r"exp_zip.zip is a zip archive: unzip it"):
        Qwen3Transformer.from_pretrained(archive)
