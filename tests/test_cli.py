"""The generate and export subcommands, on a checkpoint of a short CLI run."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch

from qwen3_lightning.cli import main
from qwen3_lightning.interop import load_checkpoint
from qwen3_lightning.model import Qwen3Transformer

ROOT = Path(__file__).resolve().parents[1]
POEMS = "\n\n".join(
    ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"] * 4
)


OVERRIDES = "{num_decoder_layer: 1, hidden_size: 32, intermediate_size: 64, max_position_embeddings: 64}"
OVERRIDES_DICT = {"num_decoder_layer": 1, "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 64}


def cli_args(command: str, corpus: Path, root: Path, *extra: str) -> list[str]:
    """A LightningCLI command on the tiny config with a one-layer model, writing under ``root``."""
    return [command, "--config", str(ROOT / "configs/tiny.yaml"), "--data.train_path", str(corpus),
            "--data.val_split", "0.25", "--data.max_length", "32", "--model.overrides", OVERRIDES,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "poems.txt"
    corpus.write_text(POEMS, encoding="utf-8")
    main(cli_args("fit", corpus, tmp, "--trainer.max_steps", "3"))
    return tmp / "checkpoints" / "last.ckpt"


def run_cli(*args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *python, "-m", "qwen3_lightning", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


LIGHTNING_PACKAGES = {"lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning", "torchmetrics"}


def imported_modules(importtime: str) -> set[str]:
    """The top-level packages that ``python -X importtime`` lists on stderr as imported."""
    return {m.split(".")[0] for m in re.findall(r"^import time:.*\|\s+([\w.]+)$", importtime, re.MULTILINE)}


def test_generate_prints_seeded_samples(checkpoint, capsys):
    args = [
        "generate",
        "--ckpt_path",
        str(checkpoint),
        "--prompt",
        "春眠",
        "--max_new_tokens",
        "12",
        "--temperature",
        "0.8",
        "--top_k",
        "5",
        "--num_samples",
        "2",
        "--seed",
        "0",
    ]
    first = run_cli(*args, python=("-X", "importtime"))  # through `python -m`, once; again in this process
    assert first.returncode == 0, first.stderr[-2000:]
    # generate needs no Trainer: it starts without importing Lightning (about half of its start-up time)
    imported = imported_modules(first.stderr)
    assert {"torch", "jsonargparse", "qwen3_lightning"} <= imported
    assert not imported & LIGHTNING_PACKAGES, "generate imported Lightning"
    main(args)
    assert capsys.readouterr().out == first.stdout  # same seed, same text
    main([*args[:-1], "1"])
    assert capsys.readouterr().out != first.stdout  # another seed, other text
    samples = [line for line in first.stdout.splitlines() if line.startswith("春眠")]
    assert len(samples) == 2 and first.stdout.count("--- sample") == 2
    _, tokenizer = load_checkpoint(checkpoint)
    assert all(c in tokenizer.token_to_id for s in samples for c in s)


@pytest.mark.parametrize("encoding", ["cp1252", "gbk"])
def test_generate_prints_to_an_output_whose_encoding_lacks_the_characters(checkpoint, encoding):
    # Windows writes output redirected to a file in its code page: cp1252 has no Chinese, GBK no "\ufffd" (<unk>)
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    args = [
        "generate",
        "--ckpt_path",
        str(checkpoint),
        "--prompt",
        "春眠\ufffd",
        "--max_new_tokens",
        "12",
        "--seed",
        "0",
    ]
    run = subprocess.run([sys.executable, "-m", "qwen3_lightning", *args], capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    out, err = run.stdout.decode(encoding), run.stderr.decode(encoding)
    assert out.startswith("??" if encoding == "cp1252" else "春眠?") and "Traceback" not in err
    assert err.count(f"warning: standard output is written in {encoding}, which lacks some characters") == 1
    assert "set PYTHONUTF8=1" in err


def test_generate_in_process_matches_greedy_model(checkpoint, capsys):
    from qwen3_lightning.cli import generate

    texts = generate(str(checkpoint), prompt="床前", max_new_tokens=8, temperature=0, device="cpu")
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("床前")]])
    expected = model.eval().generate(ids, 8, temperature=0, eos_token_id=tokenizer.eos_token_id)
    assert texts == [tokenizer.decode(expected[0, 3:].tolist())]
    assert "床前" + texts[0] in capsys.readouterr().out


def test_generate_reads_the_checkpoint_file_once(checkpoint, monkeypatch):
    from qwen3_lightning.cli import generate

    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    generate(str(checkpoint), prompt="床前", max_new_tokens=2, temperature=0, device="cpu")
    assert reads == [str(checkpoint)]


def test_generate_says_when_it_writes_past_the_trained_length(checkpoint, capsys):
    from qwen3_lightning.cli import generate

    # trained with data.max_length 32: <bos>, 2 prompt characters and 30 new tokens feed positions 0-31 back in
    generate(str(checkpoint), prompt="床前", max_new_tokens=30, temperature=0, device="cpu")
    assert "warning" not in capsys.readouterr().err
    generate(str(checkpoint), prompt="床前", max_new_tokens=31, temperature=0, device="cpu")
    assert "trained on 32 positions (data.max_length); the prompt and max_new_tokens=31 reach position 32" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        (["--temperature", "-1"], "temperature=-1.0 must be a finite number >= 0"),
        (["--max_new_tokens", "500"], "exceeds the model's max_position_embeddings=64"),
    ],
)
def test_generate_refuses_bad_input_clearly(checkpoint, args, message, capsys):
    # main() turns these errors into an exit with the message alone, no traceback, and nothing printed before
    # (not the warning about writing past the trained length, for a length that is refused)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", str(checkpoint), "--prompt", "春眠", *args])
    assert message in str(exit_info.value.code)
    assert capsys.readouterr() == ("", "")


def test_a_missing_checkpoint_names_those_beside_it(checkpoint, tmp_path):
    # a run too short to validate has no best.ckpt: the message names last.ckpt, which is there
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(checkpoint.read_bytes())
    with pytest.raises(
        SystemExit, match=r"best.ckpt does not exist. Its folder holds last.ckpt \(best.ckpt is written"
    ):
        main(["generate", "--ckpt_path", str(folder / "best.ckpt"), "--prompt", "春眠"])


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--print_config", "--model.learning_rat", "3"],
        ["generate", "--ckpt", "x.ckpt"],
        ["export", "--ckpt_path", "x.ckpt", "--out", "exported"],
    ],
)
def test_abbreviated_or_misspelt_options_are_refused(args, capsys):
    # argparse would take an unambiguous prefix as the option it begins: a typo would change a setting silently
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    # "Unrecognized" in some jsonargparse versions
    assert f"unrecognized arguments: {args[-2]} {args[-1]}" in capsys.readouterr().err.lower()


def test_generate_says_what_a_folder_is_instead_of_a_checkpoint(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"checkpoints is a folder; pass one checkpoint file in it \(.*last.ckpt"):
        main(["generate", "--ckpt_path", str(checkpoint.parent)])
    export = run_cli(
        "export", "--ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "hf"), python=("-X", "importtime")
    )
    assert export.returncode == 0, export.stderr[-2000:]
    imported = imported_modules(export.stderr)  # export, like generate, needs no Trainer
    assert {"torch", "safetensors", "qwen3_lightning"} <= imported and not imported & LIGHTNING_PACKAGES
    with pytest.raises(SystemExit, match="hf is an exported transformers model folder, not a training checkpoint"):
        main(["generate", "--ckpt_path", str(tmp_path / "hf")])


def test_generate_warns_of_unknown_characters_on_its_own_line(checkpoint, capsys):
    main(["generate", "--ckpt_path", str(checkpoint), "--prompt", "春X", "--max_new_tokens", "3", "--num_samples", "2"])
    captured = capsys.readouterr()
    assert captured.err.count("warning: the prompt has characters outside the vocabulary, read as <unk>: 'X'") == 1
    assert captured.out.count("春X") == 2


def test_generate_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(SystemExit, match=r"^error: .*notes\.txt is not a readable PyTorch checkpoint"):
        main(["generate", "--ckpt_path", str(bad)])  # an exit with the message, not a traceback


def test_export_then_load_in_transformers(checkpoint, tmp_path):
    import transformers

    main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, tokenizer = load_checkpoint(checkpoint)
    ids = tok("春眠不觉晓", return_tensors="pt").input_ids  # <bos> first, as in training
    assert ids[0].tolist() == [tokenizer.bos_token_id, *tokenizer.encode("春眠不觉晓")]
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids)).abs().max() <= 1e-5
    config = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id
    back = Qwen3Transformer.from_pretrained(tmp_path / "hf")
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight)


def test_predict_writes_jsonl(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("春眠\n\n床前明月\n举头\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    corpus = checkpoint.parents[1] / "poems.txt"
    main(cli_args("predict", corpus, tmp_path, "--ckpt_path", str(checkpoint), "--data.predict_path", str(prompts),
                  "--predict_writer.output_path", str(out), "--model.generate_kwargs",
                  "{max_new_tokens: 6, temperature: 0}", "--trainer.logger", "false"))  # fmt: skip
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["春眠", "床前明月", "举头"]
    model, tokenizer = load_checkpoint(checkpoint)
    for r in records:  # batched, left-padded generation equals each prompt alone
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(r["prompt"])]])
        alone = model.eval().generate(ids, 6, temperature=0, eos_token_id=tokenizer.eos_token_id)
        assert r["text"] == tokenizer.decode(alone[0, ids.shape[1] :].tolist())


def test_predict_validate_and_test_take_the_checkpoints_vocabulary(checkpoint, tmp_path, capsys):
    # other training data than the run's: the vocabulary comes from the checkpoint, not from rebuilding it
    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(["Some English text.", "Its letters are", "not in the", "vocabulary."]), encoding="utf-8"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "春眠"}\n{"text": ""}\n{"text": "床前"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    renamed = tmp_path / "model.pt"  # a checkpoint is known by its content, not its name
    renamed.write_bytes(checkpoint.read_bytes())
    main(cli_args("predict", other, tmp_path, "--ckpt_path", str(renamed), "--data.predict_path", str(prompts),
                  "--predict_writer.output_path", str(out), "--model.generate_kwargs",
                  "{max_new_tokens: 6, temperature: 0}", "--trainer.logger", "false"))  # fmt: skip
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # the text fields of the .jsonl lines, one output per record: an empty text starts from <bos>
    assert [r["prompt"] for r in records] == ["春眠", "", "床前"]
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("春眠")]])
    alone = model.eval().generate(ids, 6, temperature=0, eos_token_id=tokenizer.eos_token_id)
    assert records[0]["text"] == tokenizer.decode(alone[0, ids.shape[1] :].tolist())
    corpus = checkpoint.parents[1] / "poems.txt"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("春眠不觉晓，处处闻啼鸟。", encoding="utf-8")
    # a val_path changes the training split, and so the vocabulary a rebuild would give
    main(cli_args("validate", corpus, tmp_path, "--ckpt_path", str(checkpoint), "--data.val_path", str(held_out),
                  "--trainer.logger", "false"))  # fmt: skip
    assert "val_loss" in capsys.readouterr().out
    # text the checkpoint's vocabulary mostly lacks: the warning names the checkpoint, not a data.tokenizer_path
    with pytest.warns(UserWarning, match=r"100.0% of the validation characters .* the vocabulary of the checkpoint "):
        main(cli_args("validate", corpus, tmp_path, "--ckpt_path", str(checkpoint), "--data.val_path", str(other),
                      "--trainer.logger", "false"))  # fmt: skip


def test_test_and_predict_need_no_training_data(checkpoint, tmp_path, capsys):
    # a checkpoint copied to another machine, with the run's config.yaml naming training data left behind
    moved = tmp_path / "cluster" / "train.txt"
    corpus = checkpoint.parents[1] / "poems.txt"
    common = ("--ckpt_path", str(checkpoint), "--trainer.logger", "false")
    main(cli_args("test", moved, tmp_path, *common, "--data.test_path", str(corpus)))
    assert "test_loss" in capsys.readouterr().out
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("春眠\n", encoding="utf-8")
    writer = ("--predict_writer.output_path", str(out), "--model.generate_kwargs", "{max_new_tokens: 3}")
    main(cli_args("predict", moved, tmp_path, *common, "--data.predict_path", str(prompts), *writer))
    assert [json.loads(line)["prompt"] for line in out.read_text(encoding="utf-8").splitlines()] == ["春眠"]
    main(cli_args("validate", moved, tmp_path, *common, "--data.val_path", str(corpus)))  # its own validation text
    assert "val_loss" in capsys.readouterr().out
    # validate without a val_path holds out its split from the training documents, and fit trains on them
    with pytest.raises(SystemExit, match=r"data path .*cluster.train\.txt does not exist"):
        main(cli_args("validate", moved, tmp_path, *common))
    root = tmp_path / "new_run"
    with pytest.raises(SystemExit, match=r"data path .*cluster.train\.txt does not exist"):
        main(cli_args("fit", moved, root, "--data.tokenizer_path", str(checkpoint)))
    assert not root.exists()  # refused before a log folder or config.yaml is written


def test_fit_says_that_a_saved_vocabulary_ignores_vocab_size_and_min_freq(checkpoint, tmp_path):
    corpus = checkpoint.parents[1] / "poems.txt"
    quick = ("--trainer.max_steps", "1", "--trainer.logger", "false")
    args = cli_args("fit", corpus, tmp_path, "--data.tokenizer_path", str(checkpoint), "--data.min_freq", "3", *quick)
    with pytest.warns(UserWarning, match=r"data\.min_freq=3 shape a vocabulary .* used as it is"):
        main(args)


def test_fit_runs_without_a_logger_and_without_checkpoints(checkpoint, tmp_path):
    # Lightning refuses its LearningRateMonitor without a logger, and ModelCheckpoints without checkpointing
    corpus = checkpoint.parents[1] / "poems.txt"
    main(cli_args("fit", corpus, tmp_path / "a", "--trainer.max_steps", "2", "--trainer.logger", "false"))
    assert (tmp_path / "a/checkpoints/last.ckpt").is_file() and not (tmp_path / "a/logs").exists()
    main(cli_args("fit", corpus, tmp_path / "b", "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false"))
    assert (tmp_path / "b/logs/version_0/metrics.csv").is_file() and not (tmp_path / "b/checkpoints").exists()


def test_fit_sets_the_float32_matmul_precision_it_is_given_and_else_leaves_torchs(checkpoint, tmp_path):
    corpus = checkpoint.parents[1] / "poems.txt"
    seen = PrecisionSpy.seen = []  # the precision the Trainer's steps ran under, one per run
    spy = ("--trainer.callbacks+", f"{__name__}.PrecisionSpy", "--trainer.max_steps", "1")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # set by a script that runs the CLI: not overridden
        main(cli_args("fit", corpus, tmp_path / "a", *spy))
        main(cli_args("fit", corpus, tmp_path / "b", *spy, "--float32_matmul_precision", "medium"))
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == ["high", "medium"]
    saved = (tmp_path / "b/logs/version_0/config.yaml").read_text(encoding="utf-8")
    assert "float32_matmul_precision: medium" in saved.splitlines()
    with pytest.raises(SystemExit):
        main(cli_args("fit", corpus, tmp_path / "c", "--float32_matmul_precision", "low"))
    assert not (tmp_path / "c").exists()


class PrecisionSpy(L.Callback):
    """Records torch's float32 matmul precision at each training batch (a class the CLI can name)."""

    seen: ClassVar[list[str]] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.seen.append(torch.get_float32_matmul_precision())


def test_fit_from_an_initial_checkpoint_fine_tunes_its_weights(checkpoint, tmp_path):
    from qwen3_lightning.data import TextDataModule

    initial = tmp_path / "pretrained.ckpt"
    initial.write_bytes(checkpoint.read_bytes())
    other = tmp_path / "other.txt"  # other text, whose own vocabulary would differ: the checkpoint's is used
    other.write_text(
        "\n\n".join(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽。", "黄河入海流。"] * 3)
    )
    assert TextDataModule(train_path=str(other)).tokenizer != load_checkpoint(checkpoint)[1]
    root = tmp_path / "tuned"
    args = cli_args("fit", other, root, "--model.initial_checkpoint", str(initial), "--trainer.max_steps", "1")
    main([*args, "--model.learning_rate", "1e-9", "--model.min_lr", "0"])  # one step that barely moves a weight
    tuned = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    start = torch.load(checkpoint, weights_only=True)
    assert tuned["global_step"] == 1 and tuned["epoch"] == 0  # a new run, from the checkpoint's weights
    assert tuned["TextDataModule"]["tokenizer"] == start["TextDataModule"]["tokenizer"]
    assert tuned["state_dict"].keys() == start["state_dict"].keys()
    for name, weight in start["state_dict"].items():
        assert torch.allclose(tuned["state_dict"][name], weight, atol=1e-6), name
    assert tuned["initialized_from"] == str(initial) and tuned["hyper_parameters"]["initial_checkpoint"] is None
    # the fine-tuning run goes on from its own checkpoints: the initial file is not needed
    initial.unlink()
    main([*args[:-1], "2", "--ckpt_path", "last"])  # the same command, resumed
    config = str(root / "logs/version_0/config.yaml")  # its config.yaml records the initial file twice
    main(["fit", "--config", config, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    main(cli_args("fit", other, root, "--trainer.max_steps", "4", "--ckpt_path", "last"))  # without naming it
    last = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["initialized_from"] == str(initial)
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("床前\n", encoding="utf-8")
    writer = ("--predict_writer.output_path", str(out), "--model.generate_kwargs", "{max_new_tokens: 2}")
    main(["predict", "--config", config, "--ckpt_path", str(root / "checkpoints/last.ckpt"),
          "--data.predict_path", str(prompts), *writer])  # fmt: skip
    assert out.read_text(encoding="utf-8").count("\n") == 1
    from qwen3_lightning.module import Qwen3LightningModule

    assert Qwen3LightningModule.load_from_checkpoint(root / "checkpoints/last.ckpt").hparams.initial_checkpoint is None
    # a missing file is refused before any work
    with pytest.raises(SystemExit, match=r"model\.initial_checkpoint: checkpoint .*pretrained\.ckpt does not exist"):
        main(cli_args("fit", other, tmp_path / "a", "--model.initial_checkpoint", str(initial)))
    assert not (tmp_path / "a").exists()
    # the model's shape is the checkpoint's, whatever the command says, with a warning when it says otherwise
    wider = "{num_decoder_layer: 1, hidden_size: 64, intermediate_size: 64, max_position_embeddings: 64}"
    initial.write_bytes(checkpoint.read_bytes())
    tune = cli_args("fit", other, tmp_path / "b", "--model.initial_checkpoint", str(initial))
    tune += ["--model.overrides", wider]
    with pytest.warns(
        UserWarning, match=r"shape comes from model\.initial_checkpoint=.*hidden_size=32 \(this command's: 64\)"
    ):
        main([*tune, "--trainer.max_steps", "1"])
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    assert b["hyper_parameters"]["overrides"] == start["hyper_parameters"]["overrides"]
    # and so does the same command resumed once the initial file is gone: from the run's own checkpoint
    initial.unlink()
    for step, resumed in ((2, "last"), (3, str(tmp_path / "b/checkpoints/last.ckpt"))):
        with pytest.warns(UserWarning, match=r"shape comes from the checkpoint resumed, .*last.ckpt: hidden_size=32"):
            main([*tune, "--trainer.max_steps", str(step), "--ckpt_path", resumed])
        assert torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)["global_step"] == step
    # a vocabulary of the command's own is refused, naming data.tokenizer_path
    own = tmp_path / "own_tokenizer.json"
    TextDataModule(train_path=str(other)).tokenizer.save(own)
    with pytest.raises(SystemExit, match=r"trained on another vocabulary .* leave data\.tokenizer_path unset"):
        main(cli_args("fit", other, tmp_path / "c", "--model.initial_checkpoint", str(checkpoint),
                      "--data.tokenizer_path", str(own)))  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_fit_from_an_exported_directory_fine_tunes_its_weights(checkpoint, tmp_path):
    # weights that went out to the transformers format come back for more training, with their vocabulary
    exported = tmp_path / "hf"
    main(["export", "--ckpt_path", str(checkpoint), "--out_dir", str(exported)])
    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽。", "黄河入海流。"] * 3)
    )
    root = tmp_path / "tuned"
    args = cli_args("fit", other, root, "--model.initial_checkpoint", str(exported), "--trainer.max_steps", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*args, "--model.learning_rate", "1e-9", "--model.min_lr", "0"])
    assert not [w for w in caught if "shape comes from" in str(w.message)]  # the command's shape is the export's
    tuned = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    start = torch.load(checkpoint, weights_only=True)
    assert tuned["TextDataModule"]["tokenizer"]["vocab"] == start["TextDataModule"]["tokenizer"]["vocab"]
    for name, weight in start["state_dict"].items():
        assert torch.allclose(tuned["state_dict"][name], weight, atol=1e-6), name
    # a transformers directory of another tokenizer (BPE, as published Qwen3 models have) is refused
    spec = json.loads((exported / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["type"] = "BPE"
    (exported / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"tokenizer\.json is not a character vocabulary written by export"):
        main(cli_args("fit", other, tmp_path / "b", "--model.initial_checkpoint", str(exported)))


def test_an_initial_checkpoint_whose_saved_shape_is_invalid_is_named_not_a_type_error(checkpoint, tmp_path):
    # the checkpoint's preset and overrides (here a field no Qwen3Config has, as a hand-edited or foreign file may
    # hold) give no shape: the module's construction names the field, rather than the shape-difference warning
    # crashing with dataclasses.fields(None)'s TypeError
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["overrides"] = {**ckpt["hyper_parameters"]["overrides"], "num_layers": 1}
    torch.save(ckpt, tmp_path / "odd.ckpt")
    corpus = tmp_path / "poems.txt"
    corpus.write_text(POEMS, encoding="utf-8")
    args = cli_args("fit", corpus, tmp_path / "run", "--model.initial_checkpoint", str(tmp_path / "odd.ckpt"))
    with pytest.raises(SystemExit, match=r"unknown Qwen3Config field\(s\) \['num_layers'\]"):
        main([*args, "--trainer.max_steps", "1"])


def test_a_module_refuses_an_initial_checkpoint_of_another_shape(checkpoint, tmp_path):
    from qwen3_lightning.module import Qwen3LightningModule

    vocab = load_checkpoint(checkpoint)[0].config.vocab_size
    wider = {"num_decoder_layer": 1, "hidden_size": 64, "intermediate_size": 64}
    module = Qwen3LightningModule(overrides=wider, vocab_size=vocab, initial_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=r"holds another model: hidden_size=32 \(this run: 64\)"):
        module.configure_model()
    module = Qwen3LightningModule(overrides=wider, vocab_size=vocab + 1, initial_checkpoint=str(checkpoint))
    with pytest.raises(
        ValueError, match=rf"another vocabulary \({vocab} tokens\) .* \({vocab + 1} tokens, another size\)"
    ):
        module.configure_model()
    # the same size in another order: the data would be encoded with other ids than the weights learned
    from qwen3_lightning.data import TextDataModule
    from qwen3_lightning.tokenizer import CharTokenizer

    state = load_checkpoint(checkpoint)[1].to_dict()
    state["vocab"] = state["vocab"][:4] + state["vocab"][4:][::-1]
    CharTokenizer.from_dict(state).save(tmp_path / "shuffled.json")

    class OwnData(TextDataModule):  # a subclass: the checkpoint keeps the vocabulary under TextDataModule's name
        pass

    module = Qwen3LightningModule(overrides=OVERRIDES_DICT, vocab_size=vocab, initial_checkpoint=str(checkpoint))
    for kind in (TextDataModule, OwnData):
        data = kind(texts=["床前"], val_split=0, tokenizer_path=str(tmp_path / "shuffled.json"))
        with pytest.raises(ValueError, match=rf"\({vocab} tokens, the same size, in another order\)"):
            module.check_initial_checkpoint(torch.load(checkpoint, weights_only=True), str(checkpoint), data)


def test_predict_refuses_to_write_over_the_prompts_a_folder_or_another_file(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("春眠\n床前\n", encoding="utf-8")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"id": 1}\n', encoding="utf-8")
    corpus = checkpoint.parents[1] / "poems.txt"
    args = cli_args("predict", corpus, tmp_path, "--ckpt_path", str(checkpoint), "--data.predict_path", str(prompts),
                    "--model.generate_kwargs", "{max_new_tokens: 2}", "--trainer.logger", "false")  # fmt: skip
    for target, message in [
        (prompts, "is the prompts file: writing would replace them"),
        (tmp_path, "is a folder; give a file path"),
        (notes, r"holds something other than predictions"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main([*args, "--predict_writer.output_path", str(target)])
    assert prompts.read_text(encoding="utf-8") == "春眠\n床前\n"
    assert notes.read_text(encoding="utf-8") == '{"id": 1}\n'
    out = tmp_path / "out.jsonl"
    for _ in range(2):  # an earlier prediction file is replaced
        main([*args, "--predict_writer.output_path", str(out)])
        assert len(out.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize(
    ("command", "data", "message"),
    [("test", [], r"test needs data: pass test_path \(--data\.test_path"),
     ("test", ["--data.test_path", "gone.txt"], r"data path gone.txt does not exist"),
     ("predict", [], r"predict needs prompts: pass predict_path \(--data.predict_path"),
     ("predict", ["--data.predict_path", "gone.txt"], r"gone.txt does not exist"),
     ("predict", ["--data.predict_path", "prompts.txt", "--model.generate_kwargs", "{max_new_tokens: 60}"],
      r"prompt 2 of .*prompts.txt \(5 tokens\) \+ max_new_tokens \(60\) exceeds the model's "
      r"max_position_embeddings=64; ask for at most 59 new tokens")],
)  # fmt: skip
def test_test_and_predict_without_their_data_write_nothing(checkpoint, tmp_path, command, data, message):
    # refused before the run's log folder (its config.yaml and tokenizer.json) is made
    corpus = checkpoint.parents[1] / "poems.txt"
    (tmp_path / "prompts.txt").write_text("春\n床前明月\n", encoding="utf-8")
    data = [str(tmp_path / d) if d == "prompts.txt" else d for d in data]
    with pytest.raises(SystemExit, match=message):
        main(cli_args(command, corpus, tmp_path / "run", "--ckpt_path", str(checkpoint), *data))
    assert not (tmp_path / "run").exists()


def test_training_text_mostly_outside_the_vocabulary_is_refused_before_the_log_folder(checkpoint, tmp_path):
    english = tmp_path / "english.txt"
    english.write_text("Spring sleep.\n\nBirds sing.\n\nWind and rain.\n\nPetals fall.\n", encoding="utf-8")
    args = cli_args("fit", english, tmp_path / "run", "--data.tokenizer_path", str(checkpoint))
    with pytest.raises(SystemExit, match=r"100.0% of the training characters .* \(Refused: over 50%"):
        main(args)
    assert not (tmp_path / "run").exists()


def test_test_subcommand_reports_test_loss(checkpoint, tmp_path, capsys):
    corpus = checkpoint.parents[1] / "poems.txt"
    args = cli_args("test", corpus, tmp_path, "--ckpt_path", str(checkpoint), "--trainer.logger", "false")
    with pytest.raises(SystemExit, match=r"test needs data: pass test_path \(--data\.test_path"):
        main(args)
    main([*args, "--data.test_path", str(corpus)])
    out = capsys.readouterr().out
    assert "test_loss" in out and "test_ppl" in out


@pytest.mark.parametrize("named", ["last", "by-path"])
def test_validate_takes_the_checkpoints_model_shape_without_model_flags(checkpoint, named, capsys):
    # the run was trained with a one-layer model (--model.overrides); tiny.yaml alone names six layers
    run = checkpoint.parents[1]
    ckpt = "last" if named == "last" else str(checkpoint)
    main(["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--data.train_path", str(run / "poems.txt"),
          "--data.val_split", "0.25", "--data.max_length", "32", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--ckpt_path", ckpt])  # fmt: skip
    assert "val_loss" in capsys.readouterr().out
