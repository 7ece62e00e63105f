"""Two-process DDP on the CPU (gloo), resuming across strategies, and what FSDP needs that a CPU can check."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import POEMS
from torch import nn

from qwen3_lightning.data import TextDataModule
from qwen3_lightning.interop import load_checkpoint
from qwen3_lightning.module import Qwen3LightningModule
from qwen3_lightning.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2
# 16 training documents: 8 batches of 2 in one process, 4 per rank in two
TRAIN, VAL = POEMS * 2, POEMS[:2]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path]:
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n\n".join(TRAIN), encoding="utf-8")
    val.write_text("\n\n".join(VAL), encoding="utf-8")
    return train, val


def fit(corpus: tuple[Path, Path], root: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "qwen3_lightning", *fit_args(corpus, root, devices), *extra],
        capture_output=True,
        text=True,
        cwd=root.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def fit_args(corpus: tuple[Path, Path], root: Path, devices: int) -> list[str]:
    args = [
        "fit",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--data.train_path",
        str(corpus[0]),
        "--data.val_path",
        str(corpus[1]),
        "--data.batch_size",
        str(BATCH),
        "--model.overrides",
        "{num_decoder_layer: 1, hidden_size: 32, intermediate_size: 64}",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.log_every_n_steps",
        "1",
    ]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    return args


def train_tokens() -> int:
    return sum(len(doc) + 1 for doc in TRAIN)  # targets per document: its characters and <eos>


def test_ddp_fit_shards_batches_and_writes_once_then_resumes_in_one_process(corpus, tmp_path):
    root = tmp_path / "run"
    fit(corpus, root, 2, "--trainer.max_epochs", "1", "--sampler.every_n_steps", "2")
    ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == math.ceil(len(TRAIN) / 2 / BATCH)  # each rank saw its own half
    assert ckpt["tokens_seen"] == train_tokens()  # every token once, counted over both ranks
    # one run folder, one tokenizer, one config, samples from rank 0 only (2 prompts at steps 2 and 4)
    assert [p.name for p in (root / "logs").iterdir()] == ["version_0"]
    assert (root / "logs/version_0/tokenizer.json").is_file() and (root / "logs/version_0/config.yaml").is_file()
    samples = (root / "logs/version_0/samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == 4
    metrics = (root / "logs/version_0/metrics.csv").read_text()
    assert "val_loss" in metrics.splitlines()[0]

    fit(corpus, root, 1, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    resumed = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == ckpt["global_step"] + len(TRAIN) // BATCH
    model, tokenizer = load_checkpoint(root / "checkpoints/last.ckpt")
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("春眠")]])
    assert model.generate(ids, 5, temperature=0).shape == (1, 8)


def test_mid_epoch_checkpoints_resume_exactly_with_another_number_of_processes(corpus, tmp_path):
    # an epoch: 8 batches of 2 in one process, 4 per rank in two. Each leg stops mid-epoch; the next goes on
    # with the rest of that epoch, dealt out to its own processes: 2 steps in one process, the other 6 batches
    # as 3 steps of two ranks, 1 step into epoch 1, then its other 6 batches in one process. Each example is
    # trained on once an epoch, so the tokens add up to two epochs exactly (Lightning alone would count the
    # rest of an epoch in the new run's batches per epoch: 2 steps, not 3, after the first leg)
    root = tmp_path / "run"
    fit(corpus, root, 1, "--trainer.max_steps", "2", "--trainer.max_epochs", "2")
    fit(corpus, root, 2, "--trainer.max_steps", "6", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    ddp = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    position = ddp["TextDataModule"]["position"]
    assert (ddp["global_step"], position["epoch"], position["batches"]) == (6, 1, 1)
    assert ddp["tokens_seen"] > train_tokens()
    fit(corpus, root, 1, "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    resumed = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 12
    assert resumed["tokens_seen"] == 2 * train_tokens()


def test_optimizer_state_is_numbered_as_fsdp_reads_a_checkpoint_written_without_it(tmp_path):
    # Lightning's FSDP strategy, resuming a checkpoint written without FSDP, names each optimizer state after the
    # parameter at its number's position in parameters(): it must get that parameter's own state
    from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    module = Qwen3LightningModule(preset="tiny", overrides={"num_decoder_layer": 2}, vocab_size=data.vocab_size)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"][0]
    named = FullyShardedDataParallel.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_NAME, module)
    optimizer = module.optimizers(use_pl_optimizer=False)
    names = {id(p): name for name, p in module.named_parameters()}
    assert len(named["state"]) == len(optimizer.state) == len(names)
    for p, state in optimizer.state.items():
        torch.testing.assert_close(named["state"][names[id(p)]]["exp_avg"], state["exp_avg"])


def test_every_rank_builds_the_same_vocabulary_whatever_the_file_order(tmp_path):
    # the same documents in files written in opposite orders, and given in opposite orders
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, order in ((first, POEMS), (second, POEMS[::-1])):
        folder.mkdir()
        for i, doc in enumerate(order):
            (folder / f"{(i * 7) % len(order):02d}.txt").write_text(doc, encoding="utf-8")
    a = TextDataModule(train_path=str(first), val_split=0)
    b = TextDataModule(train_path=str(second), val_split=0)
    assert a.tokenizer == b.tokenizer
    assert CharTokenizer().build_vocab(POEMS) == CharTokenizer().build_vocab(POEMS[::-1])


def test_sharded_strategy_builds_on_meta_then_initializes_tied_weights(monkeypatch):
    module = Qwen3LightningModule(preset="tiny", overrides={"num_decoder_layer": 2}, vocab_size=60)
    monkeypatch.setattr(module, "_is_sharded", lambda: True)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    built_on = []
    original = torch.nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        built_on.append({p.device.type for p in self.parameters()})
        return original(self, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    module.configure_model()
    model = module.model
    assert built_on == [{"meta"}]
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004, name
    expected = 1.0 / (model.config.rope_theta ** (torch.arange(0, model.config.head_dim, 2).float() / 32))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)


def test_fsdp_config_wraps_and_checkpoints_decoder_layers(tmp_path):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from qwen3_lightning.model import Qwen3DecoderLayer

    config = yaml.safe_load((ROOT / "configs/fsdp.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Qwen3DecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Qwen3DecoderLayer}
    assert json.dumps(strategy._state_dict_type) == '"full"'


def test_sharded_gradient_clipping_uses_fsdp_own_norm(monkeypatch):
    module = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=40)
    calls = []
    wrapped = SimpleNamespace(clip_grad_norm_=lambda value: calls.append(value))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
    monkeypatch.setattr(module, "_is_sharded", lambda: True)
    module.configure_gradient_clipping(optimizer=None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert calls == [1.0]


def test_weight_decay_is_chosen_by_name_so_flat_shards_keep_it(monkeypatch):
    module = Qwen3LightningModule(overrides={"num_decoder_layer": 1, "tie_word_embeddings": False}, vocab_size=40)
    module.configure_model()
    for p in module.model.parameters():  # as FSDP with use_orig_params leaves them: flat 1-D shards
        p.data = p.data.flatten()
    module._trainer = SimpleNamespace(max_steps=10, max_epochs=None, strategy=None)
    monkeypatch.setattr(module, "_is_sharded", lambda: True)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n in names.values() if n.endswith("proj.weight") or n == "lm_head.weight"
    }
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0


class TermAt(nn.Module):
    """Cross-entropy that sends SIGTERM to its own process at its ``step``-th training call, on the ranks
    ``ranks``: a scheduler's preemption notice at an exact step."""

    def __init__(self, step: int, ranks: list[int]) -> None:
        super().__init__()
        self.step, self.ranks, self.calls = step, ranks, 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step and int(os.environ.get("LOCAL_RANK", "0")) in self.ranks:
                os.kill(os.getpid(), signal.SIGTERM)
        return nn.functional.cross_entropy(logits, labels, ignore_index=-100)


@pytest.mark.parametrize("ranks", [[0, 1], [1]], ids=["every-rank", "one-rank"])
def test_sigterm_under_ddp_stops_every_rank_and_saves_last_ckpt(corpus, tmp_path, ranks):
    root = tmp_path / "run"
    criterion = f"{{class_path: {__name__}.TermAt, init_args: {{step: 3, ranks: {ranks}}}}}"
    args = [*fit_args(corpus, root, 2), "--trainer.max_steps", "1000", "--trainer.max_epochs", "1000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "qwen3_lightning", *args, "--model.criterion", criterion],
        capture_output=True, text=True, cwd=root.parent, timeout=240, env=env,
    )  # fmt: skip
    assert "interrupted (SIGTERMException) at step 3: saved last.ckpt" in result.stderr, result.stderr[-3000:]
    assert result.returncode == 143
    assert torch.load(root / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
