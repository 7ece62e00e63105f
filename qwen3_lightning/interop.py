"""Moving weights to and from the transformers format: a directory with config.json and model.safetensors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen3_lightning.config import Qwen3Config
from qwen3_lightning.generation import GENERATE_DEFAULTS

if TYPE_CHECKING:
    from qwen3_lightning.model import Qwen3Transformer
    from qwen3_lightning.tokenizer import CharTokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a floating-point ``torch.dtype``: one already, or its name in ``DTYPES`` (transformers takes
    names too). None, or ``"auto"`` as in transformers, leaves the weights in the dtype they are in."""
    if dtype is None or dtype == "auto" or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return None if dtype == "auto" else dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (or a floating-point torch.dtype), or auto (the "
        "dtype the weights are in)."
    )


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file``; a clear error naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"line {err.lineno} column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else err
        raise ValueError(f"{file} is not valid JSON ({where}); fix it, or export the model again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a {type(data).__name__}, not a JSON object of fields; fix it, or export again.")
    return data


def is_torch_save(path: Path) -> bool:
    """Whether the zip archive ``path`` is one torch.save wrote (its pickle is ``<name>/data.pkl``)."""
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())


def check_model_path(path: Path) -> None:
    """Refuses, with what to do instead, a path that is no transformers model directory: a missing path (a hub
    id among them: nothing is downloaded), a training checkpoint, another file, or a folder without config.json."""
    if not path.exists():
        # owner/name, where no local folder "owner" exists
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None and not path.parent.exists()
        raise FileNotFoundError(
            f"{path} does not exist"
            + (
                f": there is no such folder in {Path.cwd()}, and if it is a Hugging Face hub id, nothing is "
                f"downloaded here. Give a local directory, e.g. one made by `huggingface-cli download {path} "
                "--local-dir DIR` or by `python -m qwen3_lightning export`."
                if hub
                else "; give a transformers model directory (config.json and *.safetensors)."
            )
        )
    if path.is_file():
        if path.suffix == ".ckpt" or (zipfile.is_zipfile(path) and is_torch_save(path)):
            raise ValueError(
                f"{path} is a training checkpoint, not a transformers model directory: load it with "
                "Qwen3LightningModule.load_from_checkpoint(path) (its .model is the Qwen3Transformer), or write a "
                f"transformers directory with `python -m qwen3_lightning export --ckpt_path {path} --out_dir DIR`."
            )
        if zipfile.is_zipfile(path):
            raise ValueError(f"{path} is a zip archive: unzip it, and pass the model directory it holds.")
        raise ValueError(
            f"{path} is a file; pass the transformers model directory that holds config.json and the *.safetensors "
            f"weights{f' (perhaps {path.parent})' if path.suffix in ('.json', '.safetensors') else ''}."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: it is not a transformers model directory. "
            "Export one with `python -m qwen3_lightning export`."
        )


def load_pretrained(
    cls: type[Qwen3Transformer], path: Path, dtype: torch.dtype | str | None = None
) -> Qwen3Transformer:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    dtype = as_dtype(dtype)
    check_model_path(path)
    hf_config = read_json_object(path / "config.json")
    config = Qwen3Config.from_hf_config(hf_config)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: the files its weight map names, not whatever else lies in the folder
        weight_map = read_json_object(index).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights (PyTorch .bin files are not read: they "
            "are pickles that can run code)."
        )
    # the headers first (names and shapes), so that weights that do not fit are refused before any is read
    shapes: dict[str, tuple[int, ...]] = {}
    source: dict[str, Path] = {}  # the file each tensor is in, for the messages
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key], source[key] = tuple(f.get_slice(key).get_shape()), file
        except SafetensorError as err:
            raise ValueError(
                f"{file} is truncated or not a safetensors file ({err}); download or export it again."
            ) from None
    with torch.device("meta"):
        model = cls(config)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied checkpoints may or may not store the shared matrix twice
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - shapes.keys()), sorted(shapes.keys() - expected)
    if missing or unexpected:
        untied = missing == ["lm_head.weight"] and "tie_word_embeddings" not in hf_config
        raise ValueError(
            f"weights in {path} do not fit a Qwen3 model of its config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
            + (
                " Its config.json leaves out tie_word_embeddings, which means false (transformers' default): a "
                'model whose lm_head shares the embedding needs "tie_word_embeddings": true there.'
                if untied
                else ""
            )
        )
    for key, wanted in model.state_dict().items():  # load_state_dict's size mismatch would name no file
        if key in shapes and shapes[key] != tuple(wanted.shape):
            raise ValueError(
                f"{path / 'config.json'} and the weights disagree: {key} is {shapes[key]} in {source[key]} but "
                f"{tuple(wanted.shape)} in the model that config.json describes (hidden_size={config.hidden_size}, "
                f"vocab_size={config.vocab_size}); use the config.json saved with these weights."
            )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb.inv_freq = model.model.rotary_emb._inv_freq()
    return model.to(dtype) if dtype is not None else model


def check_out_dir(out: Path) -> None:
    """Refuses an export folder that is a file, lies under one, or holds training checkpoints (a run's
    checkpoints folder: the export's files would mix with them)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file; give the path of a directory to write.")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"out_dir {out} is under {parent}, which is a file; give the path of a directory to write.")
    checkpoints = sorted(p.name for p in out.glob("*.ckpt")) if out.is_dir() else []
    if checkpoints:
        raise ValueError(
            f"out_dir {out} holds training checkpoints ({', '.join(checkpoints[:3])}): the export's files would mix "
            f"with them. Give it a folder of its own, e.g. {out.parent / 'export'}."
        )


def export_pretrained(
    model: Qwen3Transformer,
    out_dir: str | Path,
    tokenizer: CharTokenizer | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Writes config.json, model.safetensors and generation_config.json (plus the tokenizer, when given)
    so that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the model.

    ``model`` is the ``Qwen3Transformer`` (a ``Qwen3LightningModule``'s ``.model``). An existing ``out_dir`` is
    written over: these files are replaced, and the shards (``model-0000N-of-0000M.safetensors``) and
    ``model.safetensors.index.json`` of an earlier sharded export there are deleted, as transformers'
    ``save_pretrained`` does; other files are left alone."""
    from safetensors.torch import save_file

    from qwen3_lightning.model import Qwen3Transformer

    if not isinstance(model, Qwen3Transformer):
        raise ValueError(
            f"export_pretrained takes a Qwen3Transformer, got a {type(model).__name__}: for a "
            "Qwen3LightningModule pass module.model (built by load_from_checkpoint or module.configure_model())."
        )
    dtype = as_dtype(dtype)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}: its ids from {model.config.vocab_size} on have no embedding. Pass the "
            "tokenizer the model was trained with."
        )
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_config()
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors refuses shared storage; transformers re-ties on load
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    generation = {"do_sample": True, **{k: GENERATE_DEFAULTS[k] for k in ("temperature", "top_k")}}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config.update(ids)
        generation.update(ids)
        tokenizer.save(out / "vocab.json")
        write_hf_tokenizer(tokenizer, out)
    # the weights of an earlier, sharded export would stay beside the new ones and win in loaders that
    # read the index first
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    (out / "model.safetensors").chmod(0o666 & ~umask)  # safetensors writes 0600; readable as the other files
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out


def write_hf_tokenizer(tokenizer: CharTokenizer, out: Path) -> None:
    """A ``tokenizer.json`` for transformers' fast tokenizer that encodes as ``CharTokenizer`` does:
    every character is one token (split before the vocabulary lookup), unknown ones become ``<unk>``."""
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(tokenizer.id_to_token[:4])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        # <bos> first, as in training: tokenizer(text) gives what the model saw; add_special_tokens=False leaves it out
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": tokenizer.bos_token, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": tokenizer.bos_token, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                tokenizer.bos_token: {
                    "id": tokenizer.bos_token,
                    "ids": [tokenizer.bos_token_id],
                    "tokens": [tokenizer.bos_token],
                }
            },
        },
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": tokenizer.token_to_id, "unk_token": tokenizer.unk_token},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # "<eos>" in text is five characters, as CharTokenizer reads it
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A training checkpoint (``.ckpt``) as its dict, read without running pickled code; a clear error for a
    folder, a missing file, or a file that is not a checkpoint of this package."""
    path = Path(path)
    example = "e.g. runs/tiny/checkpoints/best.ckpt"
    if path.is_dir():
        if (path / "config.json").is_file():
            raise ValueError(
                f"{path} is an exported transformers model folder, not a training checkpoint: pass a .ckpt file "
                f"({example}), or load the folder with Qwen3Transformer.from_pretrained or transformers."
            )
        found = ", ".join(sorted(p.name for p in path.glob("*.ckpt"))[:5])
        raise ValueError(f"{path} is a folder; pass one checkpoint file in it{f' ({found})' if found else ''}.")
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        if others:  # best.ckpt, most often, of a run that has not yet validated
            when = " (best.ckpt is written at the first validation)" if path.name == "best.ckpt" else ""
            hint = f" Its folder holds {', '.join(others[:5])}{when}."
        else:
            hint = f" Checkpoints of a run are in <default_root_dir>/checkpoints, {example}."
        raise FileNotFoundError(f"checkpoint {path} does not exist.{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for non-checkpoint files
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if code:
            why = f"it holds pickled code ({code.group(1)}), which is never run here"
        elif zip_start and not zipfile.is_zipfile(path):  # its end, where a zip lists its contents, is missing
            why = (
                "it begins as a file of torch.save does but is cut short or damaged (a copy, a download or a save "
                "that did not finish?); copy it again, or use another checkpoint"
            )
        elif not zipfile.is_zipfile(path) or isinstance(err, pickle.UnpicklingError) or "Weights only" in str(err):
            why = "it is not a file written by torch.save"  # (which writes zip archives)
        else:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint: {why}. Pass a .ckpt file of a training run ({example})."
        ) from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hparams or "preset" not in hparams or ckpt.get("state_dict") is None or tokenizer_state(ckpt) is None:
        raise ValueError(
            f"{path} is not a checkpoint of a qwen3_lightning training run (it lacks the model's "
            "hyperparameters, weights or vocabulary)."
        )
    return ckpt


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a transformers model directory (a config.json), such as ``export`` writes."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def exported_tokenizer(path: str | Path) -> CharTokenizer:
    """The character vocabulary of a directory written by ``export``, read from its tokenizer.json."""
    from qwen3_lightning.tokenizer import SPECIAL_TOKENS, CharTokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; a directory written by export has one.")
    model = read_json_object(file).get("model")
    model = model if isinstance(model, dict) else {}
    vocab = model.get("vocab") if model.get("type") == "WordLevel" else None
    if not isinstance(vocab, dict) or any(type(i) is not int for i in vocab.values()):
        vocab = {}  # (its ids are sorted below: whole numbers only, bools aside)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS) or [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(
            f"{file} is not a character vocabulary written by export (a {model.get('type')} tokenizer): this "
            "project trains on character vocabularies, so it starts only from its own checkpoints and exports."
        )
    return CharTokenizer.from_dict({"vocab": tokens}, source=str(file))


def read_initial_checkpoint(path: str | Path, weights: bool = True) -> dict:
    """What fine-tuning reads of ``model.initial_checkpoint``: a training checkpoint (memory-mapped), or a
    directory written by ``export`` in the same shape (its model's fields as ``overrides``, its weights under
    ``model.``, its vocabulary as the DataModule's state). ``weights=False`` leaves an export's weights unread
    (no ``state_dict``), for the checks of its shape and vocabulary."""
    from qwen3_lightning.model import Qwen3Transformer

    if not is_export(path):
        return read_checkpoint(path, mmap=True)
    tokenizer = exported_tokenizer(path)
    if weights:
        model = load_pretrained(Qwen3Transformer, Path(path))
        config, state = model.config, {f"model.{k}": v for k, v in model.state_dict().items()}
    else:
        config, state = Qwen3Config.from_hf_config(read_json_object(Path(path) / "config.json")), None
    shape = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "vocab_size"}
    checkpoint = {
        "hyper_parameters": {"preset": "tiny", "overrides": shape, "vocab_size": config.vocab_size},
        "TextDataModule": {"tokenizer": tokenizer.to_dict()},
    }
    return {**checkpoint, "state_dict": state} if weights else checkpoint


def tokenizer_state(ckpt: dict) -> dict | None:
    """The tokenizer state that the DataModule keeps in a checkpoint (under its class name)."""
    return next((v["tokenizer"] for v in ckpt.values() if isinstance(v, dict) and "tokenizer" in v), None)


def checkpoint_tokenizer(path: str | Path) -> CharTokenizer:
    """The vocabulary of a training checkpoint, read without loading its weights into memory."""
    from qwen3_lightning.tokenizer import CharTokenizer

    return CharTokenizer.from_dict(tokenizer_state(read_checkpoint(path, mmap=True)), source=str(path))


def model_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``Qwen3Transformer``'s weights in a training checkpoint's ``state_dict``, where the LightningModule
    keeps them under ``model.``."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Qwen3Transformer, CharTokenizer]:
    """The model and tokenizer of a training checkpoint (``.ckpt``), read without running pickled code."""
    return model_and_tokenizer(read_checkpoint(path, map_location), path)


def model_and_tokenizer(ckpt: dict, path: str | Path) -> tuple[Qwen3Transformer, CharTokenizer]:
    """``load_checkpoint`` of a checkpoint already read (by ``read_checkpoint``) from ``path``."""
    from qwen3_lightning.model import Qwen3Transformer
    from qwen3_lightning.tokenizer import CharTokenizer

    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    config = Qwen3Config.for_vocabulary(hparams["preset"], hparams.get("overrides"), hparams["vocab_size"])
    model = Qwen3Transformer(config)
    model.load_state_dict(model_weights(state))
    return model, CharTokenizer.from_dict(tokenizer_state(ckpt), source=str(path))
