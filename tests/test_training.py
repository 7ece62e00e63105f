import csv
import itertools
import math
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import pytest
import torch
import yaml
from conftest import POEMS, quiet_trainer

from qwen3_lightning.callbacks import TextSampler, TokenThroughput, gpu_bf16_peak, matmul_flops
from qwen3_lightning.cli import main
from qwen3_lightning.data import TextDataModule, collate
from qwen3_lightning.lightning_cli import Qwen3CLI
from qwen3_lightning.model import flops_per_token
from qwen3_lightning.module import Qwen3LightningModule, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "{num_decoder_layer: 1, hidden_size: 32, intermediate_size: 64, "
    "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16}"
)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "poems.txt"
    path.write_text("\n\n".join(POEMS * 3), encoding="utf-8")
    return path


def cli_args(corpus: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--data.train_path",
        str(corpus),
        "--data.val_split",
        "0.25",
        "--data.batch_size",
        "4",
        "--model.overrides",
        TINY,
        "--model.warmup_steps",
        "3",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        *extra,
    ]


def read_metrics(root: Path, version: int = 0) -> list[dict[str, str]]:
    with open(root / "logs" / f"version_{version}" / "metrics.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def test_a_run_without_a_logger_writes_nothing_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Trainer.log_dir falls back to it; tokenizer.json once landed there
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(preset="tiny", overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, data)
    assert list(tmp_path.iterdir()) == []


def test_sampler_warns_of_prompts_outside_the_vocabulary():
    # the configs' Chinese prompts on someone's English text would sample from <unk> without a word
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    trainer = SimpleNamespace(strategy=object(), datamodule=data)
    with pytest.warns(UserWarning, match=r"read as <unk>: 'ehlo'"):
        TextSampler(prompts=["春眠", "hello"]).setup(trainer, Qwen3LightningModule(vocab_size=data.vocab_size), "fit")


def test_warmup_cosine_shape():
    values = [warmup_cosine(s, 10, 110, 0.1) for s in range(130)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(values[:10]))
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1) and values[129] == pytest.approx(0.1)


def test_fit_through_python_m_and_resume(corpus, tmp_path):
    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "qwen3_lightning", *cli_args(corpus, root, "--trainer.max_steps", "8")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = {p.name for p in (root / "checkpoints").iterdir()}
    assert {"last.ckpt", "best.ckpt"} <= ckpts
    assert (root / "logs/version_0/tokenizer.json").is_file()
    assert (root / "logs/version_0/config.yaml").is_file()
    first = read_metrics(root)
    assert max(s for s, _ in column(first, "train_loss")) == 7
    assert column(first, "val_loss") and column(first, "val_ppl")
    # resume: the global step continues from 8 to 12
    main(cli_args(corpus, root, "--trainer.max_steps", "12", "--ckpt_path", "last"))
    second = read_metrics(root, version=1)
    steps = [s for s, _ in column(second, "train_loss")]
    assert min(steps) == 8 and max(steps) == 11
    ckpt = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12


def test_learning_rate_follows_warmup_then_cosine(corpus, tmp_path):
    root = tmp_path / "run"
    main(
        cli_args(
            corpus,
            root,
            "--trainer.max_steps",
            "20",
            "--model.learning_rate",
            "1e-3",
            "--model.min_lr",
            "1e-4",
            "--model.warmup_steps",
            "5",
        )
    )
    lrs = dict(column(read_metrics(root), "lr-AdamW/pg1"))
    assert sorted(lrs) == list(range(20))
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * warmup_cosine(step, 5, 20, 0.1), rel=1e-6), step
    assert lrs[4] == pytest.approx(1e-3) and lrs[0] == pytest.approx(2e-4) and lrs[19] < 1.1e-4


def test_custom_criterion_from_the_command_line(corpus, tmp_path):
    cli = Qwen3CLI(
        args=cli_args(
            corpus,
            tmp_path / "run",
            "--trainer.max_steps",
            "1",
            "--model.criterion",
            "{class_path: torch.nn.CrossEntropyLoss, init_args: {label_smoothing: 0.2}}",
        )
    )
    assert isinstance(cli.model.criterion, torch.nn.CrossEntropyLoss)
    assert cli.model.criterion.label_smoothing == 0.2
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size  # linked, never typed twice


def test_the_cli_without_a_subcommand_builds_the_classes_for_the_caller_to_run(corpus, tmp_path):
    # LightningCLI(run=False): no subcommand, so no --ckpt_path in the parsed config; the classes are built and
    # the caller fits them itself (before_instantiate_classes read config.ckpt_path and raised AttributeError)
    args = cli_args(corpus, tmp_path / "run", "--trainer.max_steps", "1")[1:]  # without "fit"
    cli = Qwen3CLI(args=args, run=False)
    assert cli.subcommand is None and cli.model.config.vocab_size == cli.datamodule.vocab_size
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1


def test_early_stopping_from_the_command_line(corpus, tmp_path):
    # the README's flags: Lightning's EarlyStopping joins the CLI's own callbacks; an improvement of 10 nats is
    # never met, so after the first validation the second one stops the run
    early = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_loss"]
    early += ["--trainer.callbacks.patience=1", "--trainer.callbacks.min_delta=10"]
    cli = Qwen3CLI(
        args=cli_args(corpus, tmp_path / "run", "--trainer.max_epochs", "50", "--sampler.prompts", "[]", *early)
    )
    assert {"EarlyStopping", "LearningRateMonitor", "TokenThroughput"} <= {
        type(c).__name__ for c in cli.trainer.callbacks
    }
    assert cli.trainer.current_epoch == 2 and len(column(read_metrics(tmp_path / "run"), "val_loss")) == 2
    assert (tmp_path / "run/checkpoints/best.ckpt").is_file() and (tmp_path / "run/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    # configs/fsdp.yaml is a layer over a preset config; the others stand alone
    layers = [ROOT / "configs/large.yaml", config] if config.name == "fsdp.yaml" else [config]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[arg for c in layers for arg in ("--config", str(c))], "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    own = yaml.safe_load(config.read_text())
    for section, values in own.items():  # every value of the file reaches the configuration
        for key, value in values.items():
            if not isinstance(value, dict):
                assert printed[section][key] == value, (section, key)
    assert printed["trainer"]["gradient_clip_val"] == 1.0


def test_plain_trainer_without_the_cli(tmp_path):
    data = TextDataModule(texts=POEMS * 4, val_split=0.25, max_length=32, batch_size=4)
    model = Qwen3LightningModule(
        preset="tiny",
        overrides={"num_decoder_layer": 2, "hidden_size": 64},
        vocab_size=data.vocab_size,
        learning_rate=3e-3,
        warmup_steps=2,
    )
    trainer = quiet_trainer(max_steps=30, default_root_dir=tmp_path)
    start = trainer.validate(model, data, verbose=False)[0]["val_loss"]
    trainer.fit(model, data)
    end = trainer.callback_metrics["val_loss"].item()
    assert end < start - 1.0
    assert trainer.global_step == 30
    assert math.exp(end) == pytest.approx(trainer.callback_metrics["val_ppl"].item(), rel=1e-5)


@pytest.mark.parametrize(("warmup", "warns"), [(6, True), (0.99, True), (5, False)])
def test_a_warmup_as_long_as_the_run_is_flagged(tmp_path, warmup, warns):
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1}, warmup_steps=warmup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, default_root_dir=tmp_path).fit(model, data)
    said = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    expected = (
        f"model.warmup_steps={warmup} is not shorter than this run's 6 optimizer steps: the learning rate rises for "
        "the whole run (to model.learning_rate at most) and never decays. Lower model.warmup_steps (a fraction, "
        "such as 0.05, is that share of the run)."
    )
    assert said == ([expected] if warns else [])


def test_test_and_predict_take_loaders_of_their_own_after_fitting_a_datamodule(tmp_path):
    # Lightning sets up the fitted DataModule for test and predict too, with no test_path or predict_path
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1})
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, data)
    loader = torch.utils.data.DataLoader(data.train_dataset, batch_size=4, collate_fn=collate)
    test_loss = trainer.test(model, dataloaders=loader, verbose=False)[0]["test_loss"]
    assert test_loss == pytest.approx(loss_over_every_token(model.model, loader, uneven=False), rel=1e-5)
    prompts = torch.utils.data.DataLoader(["春眠"], collate_fn=data.collate_prompts)
    model.generate_kwargs = {"max_new_tokens": 2}
    assert [r["prompt"] for r in trainer.predict(model, dataloaders=prompts)[0]] == ["春眠"]


def loss_over_every_token(model: torch.nn.Module, loader, uneven: bool = True) -> float:
    """The cross-entropy summed over every labelled token of ``loader``, over their number: the set's loss,
    computed apart from the module."""
    total, count, per_batch = 0.0, 0, set()
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["input_ids"])
            labels = batch["labels"]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != -100).sum())
            per_batch.add(int((labels != -100).sum()))
    assert len(per_batch) > 1 or not uneven  # batches of unequal token counts: a mean of batch means differs
    return total / count


def test_validation_and_test_loss_weigh_every_token_alike(tmp_path):
    data = TextDataModule(texts=POEMS, val_split=0, max_length=64, batch_size=3)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1})
    model.configure_model()
    loader = torch.utils.data.DataLoader(data.train_dataset, batch_size=3, collate_fn=collate)
    expected = loss_over_every_token(model.model, loader)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    assert trainer.validate(model, dataloaders=loader, verbose=False)[0]["val_loss"] == pytest.approx(
        expected, rel=1e-5
    )
    assert trainer.test(model, dataloaders=loader, verbose=False)[0]["test_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_validation_and_test_losses_add_up_in_float32_under_half_precision(dtype):
    # 16-true and bf16-true cast the whole module, metric states included (module.to(dtype)); a token-weighted
    # sum of 100 batches of 32 x 1024 tokens overflows float16 (NaN) and comes to 4.53 for 5.0 in bfloat16
    model = Qwen3LightningModule(vocab_size=50).to(dtype)
    for start, metric in (
        (model.on_validation_epoch_start, model.val_loss),
        (model.on_test_epoch_start, model.test_loss),
    ):
        start()
        for _ in range(100):
            metric.update(torch.tensor(5.0, dtype=dtype), weight=torch.tensor(32 * 1024))
        assert metric.compute().item() == 5.0


def test_the_loss_is_computed_in_float32_from_half_precision_logits():
    # under 16-true or bf16-true the logits are half precision (no autocast upcasts them for the loss)
    model = Qwen3LightningModule(vocab_size=50, overrides={"num_decoder_layer": 1})
    model.configure_model()
    model.to(torch.bfloat16)
    batch = collate([(torch.randint(4, 50, (17,)), torch.randint(4, 50, (17,)))] * 2)
    loss, _ = model._loss(batch)
    logits = model(batch["input_ids"], batch.get("attention_mask"))
    assert loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("cuda", "native_bf16", "expected"),
    [(False, False, "32-true"), (True, True, "bf16-mixed"), (True, False, "16-mixed")],
    ids=["cpu", "ampere-or-later", "v100-or-t4"],
)
def test_the_default_precision_is_bf16_only_where_the_gpu_computes_it_natively(
    monkeypatch, cuda, native_bf16, expected
):
    from qwen3_lightning.lightning_cli import default_precision

    # torch says bf16 is supported on a V100 or T4 unless asked about native support: it emulates it, slowly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )
    assert default_precision() == expected


def test_every_run_logs_tokens_per_second_and_mfu_on_a_cpu(tmp_path):
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(preset="tiny", overrides={"num_decoder_layer": 2}, vocab_size=data.vocab_size)
    trainer = quiet_trainer(
        max_steps=13,  # short runs log too: the default window is 10 batches
        accelerator="cpu",
        callbacks=[TokenThroughput()],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    rows = read_metrics(tmp_path)
    tokens_per_s = [v for _, v in column(rows, "train/device/items_per_sec")]
    mfu = [v for _, v in column(rows, "train/device/mfu")]
    assert len(tokens_per_s) >= 4 and all(v > 0 for v in tokens_per_s)
    # against a matmul timed on this CPU at setup; a 2-layer model with batches of a few dozen tokens is far
    # from it, but above zero and below the peak
    assert len(mfu) == len(tokens_per_s) and all(0 < v < 1 for v in mfu)


def test_the_model_summary_counts_one_sequence_of_max_length(tmp_path, monkeypatch):
    # Lightning's summary at the start of fit counts FLOPs by running example_input_array through the model
    from lightning.pytorch.utilities.model_summary import summarize
    from torch.nn.attention import SDPBackend, sdpa_kernel

    data = TextDataModule(texts=POEMS, val_split=0, max_length=24, batch_size=4)
    model = Qwen3LightningModule(preset="tiny", overrides={"num_decoder_layer": 2}, vocab_size=data.vocab_size)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, data)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees
        summary = summarize(model)
    assert summary.total_flops == flops_per_token(model.config, 24) * 24 / 3  # a forward pass
    # under FSDP a forward outside the root wrapper would break it: no example there
    sharded = Qwen3LightningModule(preset="tiny", vocab_size=data.vocab_size)
    sharded.trainer = trainer
    monkeypatch.setattr(sharded, "_is_sharded", lambda: True)
    sharded.setup("fit")
    assert sharded.example_input_array is None


def test_mfu_on_gpus_is_over_the_dense_datasheet_peak(monkeypatch):
    # Lightning (2.6) finds no peak for "NVIDIA H200" and warns so; the callback knows it
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.trainer.states import RunningStage

    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    trainer.state.stage = RunningStage.TRAINING
    monitor = TokenThroughput()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.setup(trainer, Qwen3LightningModule(vocab_size=50), "fit")
    assert monitor.available_flops == 989e12
    assert {t.available_flops for t in monitor._throughputs.values()} == {989e12}
    assert gpu_bf16_peak("NVIDIA H100 PCIe") == gpu_bf16_peak("NVIDIA H100 80GB HBM2e") == 756e12
    assert gpu_bf16_peak("NVIDIA H200 NVL") == 835e12
    assert gpu_bf16_peak("NVIDIA GeForce RTX 4090") is None


@pytest.mark.parametrize(("bf16", "warns"), [(1e9, True), (200e9, False)], ids=["emulated", "native"])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged(monkeypatch, bf16, warns):
    # on CPUs with no AVX512-BF16 or AMX, bf16 matmuls can run many times slower than float32 ones (1 vs 78
    # GFLOP/s measured on an AVX2 EPYC); the peaks timed for MFU show it, and the run says so at setup
    from qwen3_lightning import callbacks

    monkeypatch.setattr(callbacks, "matmul_flops", lambda dtype, *a: bf16 if dtype == torch.bfloat16 else 78e9)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert TokenThroughput._peak(trainer) == bf16
    said = [str(w.message) for w in caught if "slower than float32" in str(w.message)]
    if warns:
        assert said == [
            "trainer.precision=bf16-mixed is slower than float32 on this CPU: its bf16 matmuls ran at 1 GFLOP/s, "
            "float32 ones at 78 GFLOP/s (no native bf16 here: AVX512-BF16 or AMX). Train with "
            "--trainer.precision 32-true on it; bf16 pays on GPUs."
        ]
    else:
        assert said == []


@pytest.mark.parametrize(("seconds", "matmuls", "rate"), [(2.0, 1, 2 * 8**3 / 2.0), (0.1, 9, 2 * 8**3 * 2 / 0.1)])
def test_the_cpu_peak_timing_stays_within_its_budget(monkeypatch, seconds, matmuls, rate):
    # each perf_counter call comes `seconds` after the last, so a timed stretch "takes" that long: a first matmul
    # over the 1 s budget is the answer alone; a faster one sets 2 matmuls a round for the four rounds
    from qwen3_lightning import callbacks

    calls, clock = [], itertools.count(0.0, seconds)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(callbacks.torch, "mm", lambda a, b: calls.append(1))
    assert callbacks.matmul_flops(torch.float32, n=8, reps=5, budget_s=1.0) == pytest.approx(rate)
    assert len(calls) == matmuls


def test_validation_flops_are_a_forward_pass():
    model = Qwen3LightningModule(preset="tiny", vocab_size=50)
    model.configure_model()
    model._loss({"input_ids": torch.zeros(3, 16, dtype=torch.long), "labels": torch.zeros(3, 16, dtype=torch.long)})
    training = model.flops_per_batch
    model.eval()
    assert model.flops_per_batch == pytest.approx(training / 3)
    assert training == pytest.approx(flops_per_token(model.config, 16) * 3 * 16)


def test_timing_the_cpu_peak_leaves_the_random_state_alone():
    # it runs in setup, before the model is initialized: drawing from the global generator would change the weights
    state = torch.get_rng_state()
    assert matmul_flops(torch.float32, n=64) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_overfits_one_batch():
    L.seed_everything(0)
    data = TextDataModule(texts=POEMS[:4], val_split=0, max_length=32, batch_size=4)
    batch = collate([data.train_dataset[i] for i in range(4)])
    model = Qwen3LightningModule(
        preset="tiny",
        overrides={"num_decoder_layer": 2},
        vocab_size=data.vocab_size,
        learning_rate=5e-3,
        min_lr=5e-3,
        warmup_steps=0,
        weight_decay=0.0,
    )
    trainer = quiet_trainer(max_steps=100, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader([batch], batch_size=None))  # the same batch every step
    # the first character after <bos> differs between the poems and cannot be memorized; the rest can
    batch["labels"][:, 0] = -100
    model.eval()
    with torch.no_grad():
        loss, _ = model._loss(batch)
    assert loss.item() < 0.05


class ClipRecorder(Qwen3LightningModule):
    """Records the total gradient norm right after clipping, and whether the optimizer is fused."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.clipped_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.fused = optimizer.param_groups[0]["fused"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_with_the_fused_optimizer(precision):
    # Lightning's own mixed-precision clipping refuses fused optimizers; bf16-mixed (the default on GPUs)
    # with the default fused AdamW and clipping must still train, with clipped gradients
    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = ClipRecorder(preset="tiny", overrides={"num_decoder_layer": 2}, vocab_size=data.vocab_size)
    model.clipped_norms = []
    trainer = quiet_trainer(max_steps=3, precision=precision, gradient_clip_val=1e-3, limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.global_step == 3 and model.fused
    assert len(model.clipped_norms) == 3
    assert all(norm == pytest.approx(1e-3, rel=1e-3) for norm in model.clipped_norms)  # raw norms are far above


@pytest.mark.parametrize(("precision", "fused"), [("16-mixed", False), ("bf16-mixed", True), ("32-true", True)])
def test_fused_adamw_by_default_except_under_float16(precision, fused, monkeypatch):
    # float16 gradients are still scaled when Lightning clips them, which it cannot do for a fused optimizer
    model = Qwen3LightningModule(vocab_size=50)
    model.configure_model()
    model.trainer = L.Trainer(max_steps=10, logger=False)
    monkeypatch.setattr(L.Trainer, "precision", property(lambda self: precision))  # 16-mixed needs a GPU
    assert bool(model.configure_optimizers()["optimizer"].param_groups[0]["fused"]) is fused


@pytest.mark.parametrize(("compile", "strategy"), [(False, "auto"), (True, "auto"), ("layers", "auto"), (True, "fsdp")])
def test_gradient_checkpointing_and_compile_options_reach_the_model(compile, strategy):
    model = Qwen3LightningModule(vocab_size=50, gradient_checkpointing=bool(compile), compile=compile)
    if strategy == "fsdp":  # FSDP itself needs several processes; configure_model reads the strategy's name

        class FSDPStrategy:
            root_device = torch.device("cpu")

        model._trainer = SimpleNamespace(strategy=FSDPStrategy())
    model.configure_model()
    assert model.model.gradient_checkpointing is bool(compile)
    per_layer = compile == "layers" or (compile and strategy == "fsdp")
    # nn.Module.compile() leaves each layer's module as it is and routes its calls through torch.compile
    assert [layer._compiled_call_impl is not None for layer in model.model.model.layers] == [per_layer] * 6
    whole = [
        hasattr(getattr(model, f"{s}_step"), "_torchdynamo_orig_callable") for s in ("training", "validation", "test")
    ]
    assert whole == [compile is True and strategy == "auto"] * 3  # torch.compile's wrapper of a function


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match=r"model.compile='max-autotune' must be true, false or 'layers'"):
        Qwen3LightningModule(vocab_size=50, compile="max-autotune")


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Qwen3LightningModule(overrides={"attention_bias": True, "tie_word_embeddings": False}, vocab_size=50)
    model.configure_model()
    model.trainer = L.Trainer(max_steps=10, logger=False)
    opt = model.configure_optimizers()["optimizer"]
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == model.hparams.weight_decay > 0
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for pid, name in names.items():
        assert (pid in decay) == (name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name), name


def test_hparams_rebuild_the_module(corpus, tmp_path):
    main(cli_args(corpus, tmp_path / "run", "--trainer.max_steps", "2"))
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    module = Qwen3LightningModule.load_from_checkpoint(ckpt, weights_only=True)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(module.model.model.embed_tokens.weight, saved["model.model.embed_tokens.weight"])
    assert yaml.safe_load((tmp_path / "run/logs/version_0/hparams.yaml").read_text())["preset"] == "tiny"


class ReadSpy(Qwen3LightningModule):
    """Records every read of a tensor's value (``item``, ``tolist``, ``bool``, ``float``, ``int``) and every
    tensor made on a device from host data (``torch.tensor(..., device=)``, ``new_tensor``) inside
    ``training_step``: on a GPU each one makes the CPU wait for the forward before it can queue the backward."""

    reads: ClassVar[list[str]] = []
    inside = False

    def training_step(self, batch, batch_idx):
        type(self).inside = True
        try:
            return super().training_step(batch, batch_idx)
        finally:
            type(self).inside = False


@pytest.mark.parametrize("accumulate", [1, 3])
def test_training_steps_read_no_tensor_and_tokens_seen_counts_every_batch(monkeypatch, accumulate):
    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if ReadSpy.inside:
                ReadSpy.reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "new_tensor"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    make = torch.tensor

    def made(*args, **kwargs):  # on a device: on a GPU, a copy from the host that waits for the GPU as well
        if ReadSpy.inside and "device" in kwargs:
            ReadSpy.reads.append("torch.tensor")
        return make(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", made)
    monkeypatch.setattr(ReadSpy, "reads", [])
    data = TextDataModule(texts=POEMS * 2, val_split=0, max_length=32, batch_size=3)  # 6 batches
    model = ReadSpy(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
    # 3 steps of 3 batches, or 6 of 1: the tokens of the window's first batches count too
    quiet_trainer(max_epochs=1, accumulate_grad_batches=accumulate, limit_val_batches=0).fit(model, data)
    assert ReadSpy.reads == []
    labels = [batch["labels"] for batch in data.train_dataloader()]
    assert len(labels) == 6 and model.global_step == 6 // accumulate
    assert model.tokens_seen == sum(int((y != -100).sum()) for y in labels)


@pytest.mark.parametrize("clip", [1.0, None])
def test_fused_adamw_with_clipping_under_a_grad_scaler_is_refused_before_the_first_step(clip):
    # a GradScaler runs only on a GPU under 16-mixed (on a CPU Lightning turns 16-mixed into bf16-mixed); the
    # CPU's own GradScaler takes its place here. Lightning would refuse the clipping only inside the first step
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, fused=True)
    trainer = quiet_trainer(
        max_steps=2, gradient_clip_val=clip, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    if clip is None:  # without clipping the fused AdamW unscales inside its step, as it should
        trainer.fit(model, data)
        assert trainer.global_step == 2 and model.optimizers().param_groups[0]["fused"]
        return
    with pytest.raises(ValueError, match=r"model.fused=true cannot clip gradients \(trainer.gradient_clip_val=1.0\)"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


def test_steps_the_grad_scaler_skips_raise_no_warning_about_the_schedules_order(recwarn):
    # 16-mixed on a GPU: while the GradScaler finds its scale it skips the steps whose gradients overflow, and
    # torch warns at the first that the schedule stepped before the optimizer. The CPU's GradScaler, started at
    # a scale that overflows, skips every step here
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = TextDataModule(texts=POEMS, val_split=0, max_length=32, batch_size=4)
    model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, data)
    assert scaler.get_scale() < 2.0**40  # lowered after each overflow: the steps were skipped
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_tokens_seen_is_logged_exactly_past_float32s_16_7m(tmp_path):
    data = TextDataModule(texts=POEMS * 2, val_split=0, max_length=32, batch_size=3)
    data.setup("fit")
    total = sum(int((batch["labels"] != -100).sum()) for batch in data.train_dataloader())
    model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
    model.tokens_seen = 2**24 + (total + 1) % 2  # an odd count at the end: float32 has none above 2**24
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    quiet_trainer(max_epochs=1, limit_val_batches=0, logger=logger, log_every_n_steps=1).fit(model, data)
    assert model.tokens_seen == 2**24 + (total + 1) % 2 + total and model.tokens_seen % 2 == 1
    assert column(read_metrics(tmp_path), "tokens_seen")[-1][1] == model.tokens_seen


class SparingThroughput(TokenThroughput):
    """What a GPU run does (a batch timed only where its throughput is logged), on the CPU; records the timings."""

    def times_every_batch(self, trainer):
        return False

    def _time(self, trainer, stage):
        self.timed.append((stage.value, trainer.global_step))
        super()._time(trainer, stage)


def test_on_a_gpu_throughput_times_only_the_logged_batches_and_counts_the_flops_of_all(tmp_path):
    # timing a batch on a GPU synchronizes it; at every batch that would stall the GPU while the CPU queues the
    # next. Fixed-length batches: the logged MFU times the peak over the logged tokens/s is the FLOPs per token
    # only if the FLOPs of the untimed batches are counted too
    data = TextDataModule(texts=POEMS * 8, val_split=0.25, max_length=16, batch_size=2, packing=True)
    model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
    monitor = SparingThroughput(window_size=8)
    monitor.timed = []
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    trainer = quiet_trainer(
        max_steps=20,
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=4,
        val_check_interval=10,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    train = [step for stage, step in monitor.timed if stage == "train"]
    # the logged batches (every 4th) and the last before the validation at 10; not again before the one at 20,
    # which follows a logged batch
    assert train == [4, 8, 10, 12, 16, 20], monitor.timed
    # validation likewise: of its 7 batches, the 4th (logged) and the end, not each batch
    validations = [step for stage, step in monitor.timed if stage == "validate"]
    assert validations == [10, 10, 20, 20]
    # the windows are in timed batches (3 entries: 8 batches at one every 4)
    windows = {stage.value: t._time.maxlen for stage, t in monitor._throughputs.items()}
    assert windows == {"train": 3, "validate": 3}
    rows = read_metrics(tmp_path)
    tokens_per_s, mfu = column(rows, "train/device/items_per_sec"), column(rows, "train/device/mfu")
    assert len(tokens_per_s) >= 3 and [s for s, _ in tokens_per_s] == [s for s, _ in mfu]
    per_token = flops_per_token(model.config, 16)
    for (_, rate), (_, share) in zip(tokens_per_s, mfu, strict=True):
        assert share * monitor.available_flops / rate == pytest.approx(per_token, rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "bar"),
    [
        (["--trainer.enable_progress_bar", "true"], "ThrottledProgressBar"),
        (["--trainer.enable_progress_bar", "false"], "NoneType"),
        (
            [
                "--trainer.enable_progress_bar=true",
                "--trainer.callbacks+=TQDMProgressBar",
                "--trainer.callbacks.refresh_rate=5",
            ],
            "TQDMProgressBar",
        ),
    ],
    ids=["default", "none", "the-users-own"],
)
def test_the_cli_draws_its_own_bar_unless_told_otherwise(corpus, tmp_path, extra, bar):
    args = cli_args(corpus, tmp_path / "run", "--trainer.max_steps", "2", "--sampler.prompts", "[]", *extra)
    assert type(Qwen3CLI(args=args).trainer.progress_bar_callback).__name__ == bar


def test_the_bar_redraws_at_most_every_interval_and_at_the_end(monkeypatch):
    # each redraw reads the loss back from the device: on a GPU, a wait for it to finish the step
    from qwen3_lightning.callbacks import ThrottledProgressBar

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    bar = ThrottledProgressBar(min_interval_s=0.5)
    drawn = []
    for batch in range(1, 11):
        if bar._should_update(batch, 10):
            drawn.append(batch)
        now[0] += 0.2
    assert drawn == [1, 4, 7, 10]  # 0.6 s apart, and the last batch
    bar._stopping = True  # the run's last batch (max_steps, a stop) before the epoch's end
    assert bar._should_update(3, 10)


@pytest.mark.parametrize("bar", ["ThrottledProgressBar", "TQDMProgressBar"])
def test_under_the_clis_bar_the_loss_is_read_back_only_when_it_redraws(monkeypatch, bar):
    # Lightning turns the progress bar's metrics into numbers after every batch (a wait for a GPU); under the
    # CLI's bar the loss is no progress-bar metric, and the bar reads it itself when it redraws. Under another
    # bar (Lightning's default, in a project of the user's own) it stays one, as before
    from lightning.pytorch.callbacks import TQDMProgressBar

    from qwen3_lightning.callbacks import ThrottledProgressBar

    reads = []
    item = torch.Tensor.item

    def read(self):
        if any(f.name == "convert_tensors_to_scalars" for f in traceback.extract_stack(limit=8)):
            reads.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", read)
    data = TextDataModule(texts=POEMS * 2, val_split=0, max_length=32, batch_size=3)  # 6 batches
    model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
    shown = ThrottledProgressBar(min_interval_s=1e9) if bar == "ThrottledProgressBar" else TQDMProgressBar()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, enable_progress_bar=True, callbacks=[shown])
    trainer.fit(model, data)
    assert "train_loss" in shown.get_metrics(trainer, model)
    if bar == "ThrottledProgressBar":
        assert "train_loss" not in trainer.progress_bar_metrics and reads == []
    else:
        assert "train_loss" in trainer.progress_bar_metrics and len(reads) >= 6


def test_fused_clipping_is_refused_under_fsdps_sharded_scaler_too():
    # FSDPPrecision is no MixedPrecision, but under 16-mixed it has a ShardedGradScaler
    from qwen3_lightning.module import check_fused_clipping

    with pytest.raises(ValueError, match=r"model\.fused=true cannot clip gradients"):
        check_fused_clipping(True, SimpleNamespace(scaler=object()), 1.0)
    check_fused_clipping(True, SimpleNamespace(scaler=None), 1.0)  # bf16-mixed: no scaler, clipping is fine
    check_fused_clipping(None, SimpleNamespace(scaler=object()), 1.0)  # fused unset: 16-mixed picks unfused
