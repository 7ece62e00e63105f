"""Interrupted runs resume exactly, runs repeat exactly, bad input is refused clearly, checkpoints load safely."""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import POEMS, quiet_trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from qwen3_lightning.callbacks import ResumeCheckpoint
from qwen3_lightning.cli import main
from qwen3_lightning.data import TextDataModule
from qwen3_lightning.interop import load_checkpoint
from qwen3_lightning.lightning_cli import refuse_to_overwrite, resolve_ckpt_path
from qwen3_lightning.module import Qwen3LightningModule
from qwen3_lightning.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = "{num_decoder_layer: 1, hidden_size: 32, intermediate_size: 64, max_position_embeddings: 64}"


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "poems.txt"
    path.write_text("\n\n".join(POEMS * 2), encoding="utf-8")
    return path


def fit_args(corpus: Path, root: Path, *extra: str) -> list[str]:
    fixed = (
        "--data.val_split 0.125 --data.batch_size 2 --data.max_length 32 --model.warmup_steps 3 "
        "--trainer.log_every_n_steps 1 --trainer.enable_progress_bar false --trainer.max_epochs -1 --sampler.prompts []"
    ).split()
    return ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.train_path", str(corpus),
            "--model.overrides", SMALL, "--trainer.default_root_dir", str(root), *fixed, *extra]  # fmt: skip


def losses(root: Path, version: int) -> dict[int, float]:
    with open(root / "logs" / f"version_{version}" / "metrics.csv", encoding="utf-8") as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qwen3_lightning", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# -- interrupted runs ------------------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    # 14 training documents in batches of 2: 7 steps an epoch; last.ckpt every 5 steps, so mid-epoch
    steps = "150"
    reference = tmp_path / "reference"
    assert main(fit_args(corpus, reference, "--trainer.max_steps", steps)) is None
    expected = losses(reference, 0)
    assert sorted(expected) == list(range(150))

    run = tmp_path / "run"
    args = fit_args(corpus, run, "--trainer.max_steps", steps, "--resume_checkpoint.every_n_train_steps", "5")
    process = start(args, tmp_path)
    wait_for(run / "checkpoints/last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    # killed mid-run; the checkpoint is usually mid-epoch, but the kill's timing decides (the SIGTERM tests
    # below cover each position deterministically)
    assert 0 < saved < 150, saved

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*args, "--ckpt_path", "last"])
    # Lightning 2.6's loaders and loops under newer torch: a FutureWarning in every run, not the user's to fix
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    resumed = losses(run, 1)
    assert min(resumed) == saved and max(resumed) == 149
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 150


class TermAt(nn.Module):
    """Cross-entropy that sends this process SIGTERM (what a scheduler does before preemption) at its
    ``step``-th training call: an interruption at an exact step, without timing."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        super().__init__()
        self.step, self.signum, self.calls = step, signum, 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step:
                os.kill(os.getpid(), self.signum)  # SIGINT (Ctrl-C) raises here, inside the batch's forward
        return nn.functional.cross_entropy(logits, labels)


EPOCHS_4 = ["--trainer.max_epochs", "4"]  # 28 steps


@pytest.mark.parametrize(
    ("step", "extra", "at"),
    [
        (11, [], 11),  # mid-epoch, in the second epoch (7 steps an epoch)
        (14, [], 14),  # on the last batch of the second epoch
        (10, ["--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null"], 10),  # after a val
        # a run limited by epochs: Lightning builds the data loader early then (for the schedule's length)
        (11, EPOCHS_4, 11),
        (14, [*EPOCHS_4, "--trainer.max_steps", "25"], 14),
        # gradient accumulation: optimizer steps after batches 2, 4, 6, 7 (the epoch's last), 9 and 11
        (11, ["--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "12"], 6),
    ],
    ids=["mid-epoch", "epoch-end", "after-mid-epoch-validation", "mid-epoch-max-epochs", "epoch-end-both-limits",
         "accumulating"],
)  # fmt: skip
def test_interrupted_run_resumes_exactly(corpus, tmp_path, step, extra, at):
    steps = ["--trainer.max_steps", "25", *extra]
    main(fit_args(corpus, tmp_path / "reference", *steps))
    expected = losses(tmp_path / "reference", 0)
    run = tmp_path / "run"
    criterion = f"{{class_path: {__name__}.TermAt, init_args: {{step: {step}}}}}"
    with pytest.raises(SystemExit, match="143"):  # 128 + SIGTERM
        main(fit_args(corpus, run, *steps, "--model.criterion", criterion))
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == at
    main(fit_args(corpus, run, *steps, "--ckpt_path", "last"))
    resumed = losses(run, 1)  # by step: each row has the step it would have had without the interruption
    assert resumed == pytest.approx({s: loss for s, loss in expected.items() if s >= at}, abs=1e-5)
    assert len(resumed) == len(expected) - at > 0


def validations(root: Path, version: int) -> dict[int, float]:
    with open(root / "logs" / f"version_{version}" / "metrics.csv", encoding="utf-8") as f:
        return {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")}


def test_ctrl_c_inside_a_batch_resumes_with_the_validations_of_an_uninterrupted_run(corpus, tmp_path):
    # Ctrl-C raises inside the batch's forward: that batch is trained again on resume, and must not count twice
    # in the run's batch total, which places validations every 3 batches across epochs
    steps = ["--trainer.max_steps", "25", "--trainer.val_check_interval", "3"]
    steps += ["--trainer.check_val_every_n_epoch", "null"]
    main(fit_args(corpus, tmp_path / "reference", *steps))
    run = tmp_path / "run"
    for version, step in enumerate((11, 5)):  # stopped twice: each stop would have moved them one batch more
        criterion = f"{{class_path: {__name__}.TermAt, init_args: {{step: {step}, signum: {int(signal.SIGINT)}}}}}"
        resume = ["--ckpt_path", "last"] if version else []
        with pytest.raises(SystemExit) as stopped:
            main(fit_args(corpus, run, *steps, "--model.criterion", criterion, *resume))
        assert stopped.value.code == 1
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 14
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert batches["ready"] == batches["started"] == batches["processed"] == 14
    main(fit_args(corpus, run, *steps, "--ckpt_path", "last"))
    expected = validations(tmp_path / "reference", 0)
    resumed = {**validations(run, 0), **validations(run, 1), **validations(run, 2)}
    assert resumed == pytest.approx(expected, abs=1e-5)
    reference = losses(tmp_path / "reference", 0)
    assert losses(run, 2) == pytest.approx({s: loss for s, loss in reference.items() if s >= 14}, abs=1e-5)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["--trainer.max_steps", "11"], ["--trainer.max_steps", "25"]),  # stopped mid-epoch by max_steps
        (["--trainer.max_epochs", "1"], ["--trainer.max_epochs", "3"]),
        (["--trainer.max_epochs", "1"], ["--trainer.max_epochs", "3", "--trainer.max_steps", "18"]),
    ],
    ids=["more-steps", "more-epochs", "more-epochs-under-max-steps"],
)
def test_a_finished_run_continues_exactly_with_a_higher_limit(corpus, tmp_path, first, then):
    # a constant rate after warmup, so that the schedule does not depend on the run's length
    flat = ["--model.min_lr", "2e-3", "--model.learning_rate", "2e-3"]
    main(fit_args(corpus, tmp_path / "reference", *flat, *then))
    expected = losses(tmp_path / "reference", 0)
    run = tmp_path / "run"
    main(fit_args(corpus, run, *flat, *first))
    done = len(losses(run, 0))
    main(fit_args(corpus, run, *flat, *then, "--ckpt_path", "last"))
    resumed = losses(run, 1)
    # the rest of the interrupted epoch, then whole epochs: nothing skipped, nothing counted twice
    assert resumed == pytest.approx({s: loss for s, loss in expected.items() if s >= done}, abs=1e-5)
    assert len(resumed) == len(expected) - done > 0


def test_ckpt_path_best_and_last_are_the_run_folders_files(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "9"))  # validates after step 7, the end of the first epoch
    best = torch.load(run / "checkpoints/best.ckpt", weights_only=True)["global_step"]
    main(["validate", *fit_args(corpus, run, "--ckpt_path", "best")[1:]])
    assert "val_loss" in capsys.readouterr().out
    main(fit_args(corpus, run, "--trainer.max_steps", "12", "--ckpt_path", "best"))  # resumes from step 7
    assert best == 7 and torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 12
    with pytest.raises(SystemExit, match=r"--ckpt_path best: there is no .*empty/checkpoints/best.ckpt"):
        main(fit_args(corpus, tmp_path / "empty", "--ckpt_path", "best"))
    with pytest.warns(UserWarning, match=r"--ckpt_path last: there is no .*new/checkpoints/last.ckpt yet, so this"):
        main(fit_args(corpus, tmp_path / "new", "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert torch.load(tmp_path / "new/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    with pytest.warns(UserWarning, match="validate without --ckpt_path uses a new, untrained model"):
        main(["validate", *fit_args(corpus, tmp_path / "other")[1:]])


def test_ckpt_path_last_without_a_last_ckpt_names_the_checkpoints_there(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "9"))
    (run / "checkpoints/last.ckpt").unlink()  # (or a run with checkpoint.save_last false)
    with pytest.raises(SystemExit, match=r"there is no .*last.ckpt, but its folder holds an earlier run's best.ckpt"):
        main(fit_args(corpus, run, "--trainer.max_steps", "12", "--ckpt_path", "last"))
    main(fit_args(corpus, run, "--trainer.max_steps", "12", "--ckpt_path", str(run / "checkpoints/best.ckpt")))
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 12
    # a SLURM requeue, which resumes Lightning's hpc_ckpt_*.ckpt in the run's folder itself, goes through
    (run / "checkpoints/last.ckpt").unlink()
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"")
    checkpoint = SimpleNamespace(dirpath=str(run / "checkpoints"), filename="best")
    with pytest.warns(UserWarning, match="there is no .*last.ckpt yet"):
        assert resolve_ckpt_path("fit", "last", checkpoint, None, str(run)) is None


def test_resuming_past_max_epochs_is_refused_clearly(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_epochs", "2"))
    with pytest.raises(SystemExit, match=r"last.ckpt has trained 2 epochs, more than trainer.max_epochs=1\. To train"):
        main(fit_args(corpus, run, "--trainer.max_epochs", "1", "--ckpt_path", "last"))
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]  # refused before its log folder


def best_score(checkpoint: Path) -> tuple[float, str]:
    """The best val_loss and best.ckpt path that a checkpoint's ``checkpoint`` callback holds."""
    states = torch.load(checkpoint, weights_only=True)["callbacks"].values()
    state = next(s for s in states if s.get("monitor") == "val_loss")
    return float(state["best_model_score"]), state["best_model_path"]


def test_a_moved_run_folder_keeps_its_best_checkpoint(corpus, tmp_path):
    # the checkpoint holds its folder's absolute path; where that changed (a renamed project, runs carried to a
    # GPU machine), Lightning would forget the best score, and the next validation's model would be best.ckpt
    main(fit_args(corpus, tmp_path / "run", "--trainer.max_epochs", "2"))
    best, _ = best_score(tmp_path / "run/checkpoints/best.ckpt")
    best_step = torch.load(tmp_path / "run/checkpoints/best.ckpt", weights_only=True)["global_step"]
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    # an epoch at a rate that wrecks the model: a validation far worse than the best
    wreck = ["--model.learning_rate", "1.0", "--model.min_lr", "1.0", "--model.warmup_steps", "0"]
    main(fit_args(corpus, moved, "--trainer.max_epochs", "3", *wreck, "--ckpt_path", "last"))
    with open(moved / "logs/version_1/metrics.csv", encoding="utf-8") as f:
        resumed = [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert resumed and min(resumed) > best + 1  # the case in question: no better model came
    assert torch.load(moved / "checkpoints/best.ckpt", weights_only=True)["global_step"] == best_step
    assert best_score(moved / "checkpoints/last.ckpt") == (pytest.approx(best), str(moved / "checkpoints/best.ckpt"))


@pytest.mark.parametrize("named", ["last", "by-path"])
def test_a_resumed_run_trains_with_its_own_learning_rate(corpus, tmp_path, named):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "4", "--model.learning_rate", "2e-3", "--model.min_lr", "2e-3"))
    ckpt = "last" if named == "last" else str(run / "checkpoints/last.ckpt")  # a path: LightningCLI reads its hparams
    main(fit_args(corpus, run, "--trainer.max_steps", "8", "--model.learning_rate", "5e-4", "--model.min_lr", "5e-4",
                  "--model.weight_decay", "0.02", "--ckpt_path", ckpt))  # fmt: skip
    with open(run / "logs/version_1/metrics.csv", encoding="utf-8") as f:
        rates = [float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    assert rates == pytest.approx([5e-4] * 4)  # past warmup: the new constant rate from the first resumed step
    optimizer = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]
    assert [g["weight_decay"] for g in optimizer["param_groups"]] == [0.02, 0.0]


class SeenExamples(L.Callback):
    """The examples of the first epoch, in the order the training steps take them (padding dropped)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen += [tuple(row[row != 0].tolist()) for row in batch["input_ids"]]


def first_epoch(
    tmp_path: Path, batch_size: int, bucket: bool, max_steps: int = -1, every: int = 3, **fit
) -> list[tuple[int, ...]]:
    docs = [f"{i}{poem}" for i, poem in enumerate(POEMS * 3)]  # each one window, none alike
    data = TextDataModule(texts=docs, val_split=0, max_length=64, batch_size=batch_size, bucket_by_length=bucket)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 32})
    seen = SeenExamples()
    every_n = L.pytorch.callbacks.ModelCheckpoint(
        tmp_path, every_n_train_steps=every, save_top_k=-1, filename="s{step}", auto_insert_metric_name=False
    )
    trainer = L.Trainer(
        max_steps=max_steps, max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[seen, every_n],
    )  # fmt: skip
    trainer.fit(model, data, **fit)
    return seen.seen


@pytest.mark.parametrize(
    ("batch_size", "bucket", "checkpoint", "warning"),
    [(4, False, "s3", None), (2, False, "s3", None), (8, False, "s3", None), (5, False, "s3", None),
     (2, True, "s3", r"batch_size=4 \(now 2\).* drawn afresh"), (8, False, "s6", None)],
    ids=["same", "smaller", "larger", "uneven", "bucketed", "at-epoch-end"],
)  # fmt: skip
def test_resuming_mid_epoch_with_another_batch_size(tmp_path, batch_size, bucket, checkpoint, warning):
    # s3 saw 12 of the epoch's 24 examples. The example order does not depend on the batch size: the epoch goes
    # on with exactly its 12 unseen examples, in batches of the new size, whatever Lightning would have counted
    # them as (12 batches of 2 in the whole epoch, 3 of 8, 5 of 5, not its 6 of 4 less 3); length buckets are
    # other batches, drawn afresh; a checkpoint from the end of the epoch (s6: 6 batches of 4) leaves nothing
    # to draw and nothing to say
    whole = first_epoch(tmp_path, 4, bucket)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = first_epoch(tmp_path / "resumed", batch_size, bucket, ckpt_path=tmp_path / f"{checkpoint}.ckpt")
    said = [str(w.message) for w in caught if "mid-epoch" in str(w.message)]
    assert (len(said) == 1 and re.search(warning, said[0])) if warning else said == [], said
    assert len(set(whole)) == len(whole) == 24
    if checkpoint == "s3" and not bucket:
        assert after == whole[12:]
    if bucket:  # 12 examples again, 6 batches of 2, not necessarily the unseen ones
        assert len(after) == 12
    if checkpoint == "s6":
        assert after == []


def test_an_epoch_resumed_in_other_batches_resumes_again_exactly(tmp_path):
    # batches of 4 stop at 12 of 24 examples; batches of 5 go on and stop after one batch (17 seen), which the
    # checkpoint must count in examples, not in Lightning's count of its batches (4, less the rest's 3 = 1)
    whole = first_epoch(tmp_path, 4, False)
    of_5 = first_epoch(tmp_path / "b", 5, False, every=1, ckpt_path=tmp_path / "s3.ckpt")
    assert of_5 == whole[12:]
    for batch_size in (5, 3):  # the same batches again, and others
        assert (
            first_epoch(tmp_path / f"c{batch_size}", batch_size, False, ckpt_path=tmp_path / "b/s4.ckpt") == whole[17:]
        )


class SeenByEpoch(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[int, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows = [tuple(row[row != 0].tolist()) for row in batch["input_ids"]]
        self.seen.setdefault(trainer.current_epoch, []).extend(rows)


def two_epochs(tmp_path: Path, batch_size: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, SeenByEpoch, float]:
    """24 training examples (6 batches of 4), a validation each epoch; checkpoints at steps 3, 6 (the first
    epoch's last batch, before its validation) and at the end of each epoch (after it)."""
    docs = [f"{i}{poem}" for i, poem in enumerate(POEMS * 3)] + [f"v{i}{poem}" for i, poem in enumerate(POEMS[:4])]
    data = TextDataModule(texts=docs, val_split=4 / len(docs), max_length=64, batch_size=batch_size)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 32})
    seen = SeenByEpoch()
    name = {"save_top_k": -1, "auto_insert_metric_name": False}
    steps = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=3, filename="s{step}", **name)
    epochs = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_epochs=1, filename="e{epoch}", **name)
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[seen, steps, epochs],
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, seen, model._schedule[1]


@pytest.mark.parametrize(
    ("checkpoint", "batch_size", "steps"),
    [("s3", 2, 3 + 6 + 12), ("s6", 2, 6 + 12), ("e0", 2, 6 + 12), ("e0", 8, 6 + 3), ("s6", 4, 12)],
    ids=["mid-epoch", "after-last-batch", "after-validation", "after-validation-larger", "same"],
)
def test_a_run_resumed_in_other_batches_finishes_its_epochs_and_its_schedule(tmp_path, checkpoint, batch_size, steps):
    # the epoch after the checkpoint is whole in the new batches (Lightning alone would end it after 6 batches of
    # 2, its count so far), and the cosine schedule spans the steps the run takes (Lightning's estimate counts
    # both epochs in the new batches: 24 steps of 2, or 6 of 8)
    two_epochs(tmp_path, 4)
    trainer, seen, schedule = two_epochs(tmp_path / "resumed", batch_size, ckpt_path=tmp_path / f"{checkpoint}.ckpt")
    assert len(seen.seen[1]) == len(set(seen.seen[1])) == 24
    assert trainer.global_step == schedule == steps


class TermInValidation(L.Callback):
    """SIGTERM during the validation after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def fit_for_its_schedule(root: Path, documents: int, ckpt_path: Path | None = None, *callbacks, **limits):
    docs = [f"{i}{poem}" for i, poem in enumerate(POEMS * 4)][:documents] + [f"v{i}{p}" for i, p in enumerate(POEMS)]
    data = TextDataModule(texts=docs, val_split=8 / len(docs), max_length=64, batch_size=4)  # 2 validation batches
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 16})
    checkpoints = [ResumeCheckpoint(dirpath=str(root)), L.pytorch.callbacks.ModelCheckpoint(root, save_top_k=-1)]
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[*checkpoints, *callbacks], **limits,
    )  # fmt: skip
    with contextlib.suppress(SIGTERMException):
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model


def test_a_resumed_schedule_spans_the_steps_the_run_takes(tmp_path):
    # the states the review of the schedule's length found: a SIGTERM in the validation at an epoch's end
    # (6 steps an epoch), and a checkpoint inside an accumulation window (a validation after batch 3 of 7)
    fit_for_its_schedule(tmp_path / "a", 24, None, TermInValidation(6), max_epochs=3)
    trainer, model = fit_for_its_schedule(tmp_path / "a", 24, tmp_path / "a/last.ckpt", max_epochs=3)
    assert model._schedule[1] == trainer.estimated_stepping_batches == trainer.global_step == 18
    limits = {"max_epochs": 2, "accumulate_grad_batches": 2, "val_check_interval": 3}
    fit_for_its_schedule(tmp_path / "b", 28, **limits)
    trainer, model = fit_for_its_schedule(tmp_path / "c", 28, tmp_path / "b/epoch=0-step=1.ckpt", **limits)
    assert model._schedule[1] == trainer.estimated_stepping_batches == trainer.global_step == 8


@pytest.mark.parametrize(
    ("sent", "said", "status"),
    # 143, 128 + SIGTERM, and 1 after Ctrl-C (Lightning's): a job script can tell either from a finished run (0)
    [(signal.SIGTERM, "SIGTERMException", 143), (signal.SIGINT, "KeyboardInterrupt", 1)],
    ids=["sigterm", "ctrl-c"],
)
def test_sigterm_or_ctrl_c_saves_a_checkpoint_that_resumes(corpus, tmp_path, sent, said, status):
    run = tmp_path / "run"
    process = start(fit_args(corpus, run, "--trainer.max_steps", "100000"), tmp_path)
    wait_for(run / "checkpoints/last.ckpt", process)  # written after the first epoch: training is under way
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    saved = re.search(rf"interrupted \({said}\) at step (\d+): saved last.ckpt", stderr)
    assert saved, stderr[-3000:]
    assert process.returncode == status
    step = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert step == int(saved[1]) and 0 < step < 100000
    main(fit_args(corpus, run, "--trainer.max_steps", str(step + 3), "--ckpt_path", "last"))
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == step + 3


def test_same_seed_same_losses(corpus, tmp_path):
    main(fit_args(corpus, tmp_path / "a", "--trainer.max_steps", "20"))
    main(fit_args(corpus, tmp_path / "b", "--trainer.max_steps", "20"))
    main(fit_args(corpus, tmp_path / "c", "--trainer.max_steps", "20", "--seed_everything", "7"))
    a, b, c = losses(tmp_path / "a", 0), losses(tmp_path / "b", 0), losses(tmp_path / "c", 0)
    assert a == b and len(a) == 20
    assert a != c


class NaNAfter(nn.Module):
    """Cross-entropy that turns NaN from its ``n``-th call on, as a diverging run would."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls > self.n else loss


def test_nan_loss_stops_the_run_without_saving_it(tmp_path):
    data = TextDataModule(texts=POEMS * 2, val_split=0, max_length=32, batch_size=2)
    model = Qwen3LightningModule(
        overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, criterion=NaNAfter(4), warmup_steps=0
    )
    trainer = L.Trainer(
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[ResumeCheckpoint(every_n_train_steps=1, dirpath=str(tmp_path))],
    )
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 4 .*Lower model.learning_rate"):
        trainer.fit(model, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_nan_loss_early_in_an_accumulation_window_stops_the_run_before_its_step():
    # the losses are checked at the optimizer step (reading one in its batch would stall a GPU): every batch of
    # the window is, and the step that would apply the broken gradients is not taken
    data = TextDataModule(texts=POEMS * 2, val_split=0, max_length=32, batch_size=2)
    model = Qwen3LightningModule(
        overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, criterion=NaNAfter(1), warmup_steps=0
    )
    model.configure_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=5, accumulate_grad_batches=3)
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 0 \(batch 1\); broken on 1 of 1 "):
        trainer.fit(model, data)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_gradient_accumulation_saves_and_samples_only_after_optimizer_steps(tmp_path, monkeypatch):
    # with accumulate_grad_batches, the batches of a window before its last end at the previous step's count: at
    # global_step 0 in a new run, and at the checkpoint's step in a resumed one
    from qwen3_lightning.callbacks import TextSampler

    saved, sampled = [], []
    save = L.Trainer.save_checkpoint

    def recorded(trainer, *args, **kwargs):
        saved.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.completed))
        return save(trainer, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", recorded)
    monkeypatch.setattr(TextSampler, "sample", lambda self, trainer, *a: sampled.append(trainer.global_step))

    def fit(max_steps: int, ckpt_path: str | None = None) -> None:
        data = TextDataModule(texts=POEMS * 4, val_split=0, max_length=32, batch_size=2)
        model = Qwen3LightningModule(overrides={"num_decoder_layer": 1}, vocab_size=data.vocab_size, warmup_steps=0)
        callbacks = [
            ResumeCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path)),
            TextSampler(prompts=["春"], max_new_tokens=2, every_n_steps=2),
        ]
        trainer = quiet_trainer(max_steps=max_steps, accumulate_grad_batches=3, callbacks=callbacks)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        assert trainer.global_step == max_steps

    fit(2)
    # at the end of the 6th batch (5 completed before it), its 2nd step; none at step 0
    assert (saved, sampled) == ([(2, 5)], [2])
    saved.clear(), sampled.clear()
    fit(4, str(tmp_path / "last.ckpt"))
    assert (saved, sampled) == ([(4, 11)], [4])  # not at step 2 again, in the first window after the resume


# -- checkpoints load safely ----------------------------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_checkpoints_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"preset": "tiny"}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


# -- bad input: each row of the README's table ----------------------------------------------------------------


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


BAD_FIT_INPUT = {
    "missing data file": (lambda d: ["--data.train_path", str(d / "nope.txt")], "data path .*nope.txt does not exist"),
    "empty data file": (lambda d: ["--data.train_path", write(d / "empty.txt", "\n \n")], "no text found in"),
    "non-UTF-8 text": (
        lambda d: ["--data.train_path", write(d / "gbk.txt", "春眠不觉晓".encode("gbk"))],
        r"gbk.txt is not UTF-8 text: byte 0 is b'\\xb4'",
    ),
    "UTF-16 text (Notepad's 'Unicode')": (
        lambda d: ["--data.train_path", write(d / "u16.txt", "春眠不觉晓".encode("utf-16"))],
        r"u16.txt is not UTF-8 text: byte 0 is b'\\xff'. Convert it, e.g. `iconv -f UTF-16",
    ),
    "UTF-32 text": (
        lambda d: ["--data.train_path", write(d / "u32.txt", "春眠不觉晓".encode("utf-32"))],
        r"u32.txt is not UTF-8 text: .* Convert it, e.g. `iconv -f UTF-32",
    ),
    "binary file": (
        lambda d: ["--data.train_path", write(d / "img.txt", b"\x89PNG\r\n\x1a\n\x00\x00")],
        r"img.txt is not UTF-8 text: byte 0 is b'\\x89'",
    ),
    "bad .jsonl line": (
        lambda d: ["--data.train_path", write(d / "c.jsonl", '{"text": "好"}\n{"text": 3}\n')],
        r"c.jsonl, line 2: each line must be an object with a string field 'text'",
    ),
    "a Windows path in a YAML file's double quotes": (
        lambda d: ["--config", write(d / "win.yaml", 'data:\n  train_path: "C:\\new\\train.txt"\n')],
        r"--data.train_path 'C:\\new\\train.txt' holds a newline \(\\n\). In double quotes, YAML reads a backslash "
        r"as the start of an escape .* write Windows paths in single quotes",
    ),
    "max_length below 2": (lambda d: ["--data.max_length", "1"], "data.max_length=1 is too short"),
    "vocab_size below the specials": (lambda d: ["--data.vocab_size", "3"], "vocab_size=3 leaves no room"),
    "empty validation split": (lambda d: ["--data.val_split", "0.01"], "leaves no validation document"),
    "unknown preset": (lambda d: ["--model.preset", "giant"], "unknown preset 'giant'; available presets: tiny"),
    "impossible model shape": (
        lambda d: ["--model.overrides", "{num_attention_heads: 3, num_key_value_heads: 2}"],
        "num_attention_heads=3 is not divisible by num_key_value_heads=2",
    ),
    "unknown model field": (lambda d: ["--model.overrides", "{num_layers: 3}"], r"unknown Qwen3Config field\(s\)"),
    "bad learning rate": (lambda d: ["--model.learning_rate", "-1"], "learning_rate > 0"),
    "bad warmup": (lambda d: ["--model.warmup_steps", "1.5"], "warmup_steps=1.5 must be"),
    "AdamW betas out of range": (
        lambda d: ["--model.betas", "[0.9, 1.5]"],
        r"model.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\) \(AdamW's\)",
    ),
    "negative AdamW eps": (lambda d: ["--model.eps", "-1"], r"model.eps=-1(\.0)? must be >= 0 \(AdamW's\)"),
    "negative weight decay": (lambda d: ["--model.weight_decay", "-0.1"], "model.weight_decay=-0.1 must be >= 0"),
    "negative gradient clipping": (
        lambda d: ["--trainer.gradient_clip_val", "-1"],
        r"trainer.gradient_clip_val=-1(\.0)? must be >= 0",
    ),
    "no batches to accumulate": (
        lambda d: ["--trainer.accumulate_grad_batches", "0"],
        "trainer.accumulate_grad_batches=0 must be at least 1",
    ),
    "negative sampling interval": (
        lambda d: ["--sampler.every_n_steps", "-1"],
        "TextSampler: every_n_steps=-1 must be a number of optimizer steps >= 1",
    ),
    "negative last.ckpt interval": (
        lambda d: ["--resume_checkpoint.every_n_train_steps", "-3"],
        "ResumeCheckpoint: every_n_train_steps=-3 must be",
    ),
    "a setting Lightning refuses": (lambda d: ["--trainer.max_steps", "-5"], "max_steps.* -5"),
    "examples longer than the model's positions": (
        lambda d: ["--data.max_length", "128"],
        "data.max_length=128 is longer than the model's max_position_embeddings=64",
    ),
    "early stopping without validation data": (
        lambda d: [
            "--data.val_split",
            "0",
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=val_loss",
        ],
        "EarlyStopping monitors val_loss, but this run has no validation data",
    ),
    "min_freq above every character's count": (
        lambda d: ["--data.min_freq", "1000"],
        "data.min_freq=1000 leaves no character in the vocabulary",
    ),
    "cache_dir that is a file": (
        lambda d: ["--data.cache_dir", write(d / "cache", "x")],
        "data.cache_dir=.*cache is a file",
    ),
    "unknown generate_kwargs option": (
        lambda d: ["--model.generate_kwargs", "{max_tokens: 5}"],
        r"model.generate_kwargs has unknown option\(s\) \['max_tokens'\]; the options are max_new_tokens",
    ),
    "criterion that returns one loss a token": (
        lambda d: ["--model.criterion", "{class_path: torch.nn.CrossEntropyLoss, init_args: {reduction: none}}"],
        r"model.criterion CrossEntropyLoss returned \(\d+,\), not one number. It is called as criterion\(logits",
    ),
    "criterion for other shapes": (
        lambda d: ["--model.criterion", "torch.nn.MSELoss"],
        r"model.criterion MSELoss failed: .*must return one number",
    ),
    "sample prompt longer than the model's positions": (
        lambda d: ["--sampler.prompts", "[" + "春" * 70 + "]"],
        "leave no room to generate within the model's max_position_embeddings=64",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FIT_INPUT))
def test_bad_fit_input_is_refused_before_training(case, corpus, tmp_path, capsys):
    extra, message = BAD_FIT_INPUT[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(corpus, run, "--trainer.max_steps", "2", *extra(data_dir)))
    assert exit_info.value.code != 0
    reported = str(exit_info.value.code) + capsys.readouterr().err
    assert re.search(message, reported), reported
    assert not run.exists()  # refused before the log folder (its config.yaml and tokenizer.json) is made


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config", str(ROOT / "configs/fsdp.yaml")], r"trainer.strategy is FSDP, which Lightning runs on CUDA GPUs"),
        (["--trainer.accelerator", "gpu"], "trainer.accelerator=gpu, but this PyTorch sees no CUDA GPU; use"),
    ],
)
def test_gpu_settings_without_a_gpu_are_refused_clearly(corpus, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # runs on a GPU machine too
    with pytest.raises(SystemExit, match=message):
        main(fit_args(corpus, tmp_path / "run", *extra, "--trainer.max_steps", "1"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint.monitor", "val_los"], r"Checkpoint\(monitor='val_los'\) names no metric of this module; did"),
        (
            ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_ppx"],
            r"EarlyStopping\(monitor='val_ppx'\) names no metric of this module; did you mean 'val_ppl'\? It logs "
            "train_loss, tokens_seen, val_loss, val_ppl",
        ),
    ],
)
def test_a_misspelled_monitor_is_refused_before_the_run_starts(corpus, tmp_path, extra, message):
    # Lightning itself finds it only at the end of the first validation, and stops without a checkpoint
    with pytest.raises(SystemExit, match=message):
        main(fit_args(corpus, tmp_path / "run", *extra, "--trainer.max_steps", "1"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "poems.txt",
            "\n\n".join(POEMS),
            r"--config .*poems.txt holds a YAML str, not settings .* give it as --data.train_path",
        ),
        (
            "bad.yaml",
            "model:\n  betas: [0.9\n",
            r"bad.yaml is not valid YAML: while parsing a flow sequence \(line 2, ",
        ),
        ("list.yaml", "- fit\n- tiny\n", r"list.yaml holds a YAML list, not settings \('section: ...' lines"),
        (
            "windows.yaml",
            'data:\n  train_path: "C:\\Users\\me\\poems.txt"\n',
            r"windows.yaml is not valid YAML: .* expected escape sequence of 8 hexadecimal numbers, .* In double "
            r"quotes, YAML reads a backslash as the start of an escape .* write Windows paths in single quotes",
        ),
        ("gbk.yaml", "model: 春".encode("gbk"), r"gbk.yaml is not UTF-8 text, so no YAML config.$"),
    ],
)
def test_a_config_that_is_no_yaml_settings_is_named(tmp_path, capsys, name, content, message):
    path = Path(write(tmp_path / name, content))
    for args in (["fit", "--config", str(path)], ["fit", f"--config={path}"], ["--config", str(path), "fit"]):
        with pytest.raises(SystemExit, match=message):
            main(args)
    assert "处处闻啼鸟" not in capsys.readouterr().err  # a text given by mistake is not printed back


@pytest.mark.parametrize("encoding", ["cp1252", "GBK"])
def test_settings_beyond_ascii_need_utf8_mode_where_files_are_not_utf8(corpus, tmp_path, monkeypatch, encoding):
    # Windows outside UTF-8 mode: open() reads and writes in the ANSI code page, and so does jsonargparse
    monkeypatch.setattr("locale.getpreferredencoding", lambda do_setlocale=True: encoding)
    ascii_config = write(tmp_path / "ascii.yaml", "trainer:\n  max_steps: 1\n")
    short = ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"]
    for args in (
        ["--config", str(ROOT / "configs/tiny.yaml"), "--data.train_path", str(corpus)],  # its prompts are Chinese
        ["--config", ascii_config, "--data.train_path", str(corpus), "--sampler.prompts", "[春眠]"],  # in config.yaml
        ["--config", ascii_config, "--data.train_path", str(tmp_path / "诗.txt")],
    ):
        with pytest.raises(
            SystemExit,
            match=rf"beyond ASCII, but this Python reads and writes text files in {encoding}, .* set PYTHONUTF8=1",
        ):
            main(["fit", *args, *short])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as stop:  # ASCII settings read alike in every encoding
        main(["fit", "--config", ascii_config, "--data.train_path", str(corpus), "--print_config"])
    assert not stop.value.code
    monkeypatch.setattr("locale.getpreferredencoding", lambda do_setlocale=True: "utf-8")  # UTF-8 mode
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.train_path", str(corpus), "--print_config"])
    assert not stop.value.code


def test_a_monitor_this_module_does_not_log_is_warned_of(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    module = Qwen3LightningModule(overrides={"num_decoder_layer": 1})
    module.check_monitors(
        [ModelCheckpoint(dirpath=tmp_path), EarlyStopping("val_loss"), ModelCheckpoint(monitor="step")]
    )
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='lr-AdamW/pg1'\) is not among the metrics"):
        module.check_monitors([ModelCheckpoint(dirpath=tmp_path, monitor="lr-AdamW/pg1")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.check_monitors([ModelCheckpoint(dirpath=tmp_path, monitor="lr-AdamW/pg1")], warn=False)


def test_resuming_with_a_different_vocabulary_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))
    before = (run / "checkpoints/last.ckpt").read_bytes()
    other = write(tmp_path / "other.txt", "\n\n".join(["天地玄黄，宇宙洪荒。", "日月盈昃，辰宿列张。"] * 8))
    with pytest.raises(SystemExit, match=r"vocabulary of \d+ tokens, but this run's data gives \d+: resuming"):
        main(fit_args(corpus, run, "--trainer.max_steps", "4", "--data.train_path", other, "--ckpt_path", "last"))
    # another run's vocabulary, named: the message is about that file, not about the data
    CharTokenizer().build_vocab(["天地玄黄"]).save(tmp_path / "other.json")
    with pytest.raises(SystemExit, match=r"but data.tokenizer_path=.*other.json has 8: .* pass the checkpoint itself"):
        main(fit_args(corpus, run, "--trainer.max_steps", "4", "--ckpt_path", "last",
                      "--data.tokenizer_path", str(tmp_path / "other.json")))  # fmt: skip
    assert (run / "checkpoints/last.ckpt").read_bytes() == before  # nothing lost
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]  # refused before a log folder is made
    # with the run's own vocabulary, new text is accepted (its unknown characters, a third here, become <unk>)
    other = write(tmp_path / "other.txt", "\n\n".join(["春眠不觉晓，宇宙洪荒。", "床前明月光，辰宿列张。"] * 8))
    tokenizer = next((run / "logs").glob("version_0/tokenizer.json"))
    main(
        fit_args(
            corpus,
            run,
            "--trainer.max_steps",
            "4",
            "--data.train_path",
            other,
            "--ckpt_path",
            "last",
            "--data.tokenizer_path",
            str(tokenizer),
        )
    )
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.val_check_interval", "50"], r"val_check_interval=50 is more than the 7 training batches of an"),
        (
            ["--trainer.val_check_interval", "3", "--trainer.limit_train_batches", "2"],
            r"val_check_interval=3 is more than the 2 training batches of an epoch \(on each of 1 process",
        ),
    ],
)
def test_a_validation_interval_longer_than_an_epoch_is_refused_before_the_run(corpus, tmp_path, extra, message):
    # Lightning refuses it too, but with a traceback, once the log folder is made
    with pytest.raises(SystemExit, match=message):
        main(fit_args(corpus, tmp_path / "run", *extra, "--trainer.max_steps", "5"))
    assert not (tmp_path / "run").exists()
    main(fit_args(corpus, tmp_path / "run", "--trainer.val_check_interval", "4", "--trainer.max_steps", "5"))


def test_a_mid_epoch_checkpoint_warns_of_other_batches_only_when_training_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))  # mid-epoch: 4 length-bucketed batches an epoch
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["TextDataModule"]["position"]["batches"] == 2
    unbucketed = ("--ckpt_path", "last", "--data.bucket_by_length", "false")
    with warnings.catch_warnings(record=True) as caught:  # validate draws no training batches: nothing to say
        warnings.simplefilter("always")
        main(["validate", *fit_args(corpus, run, *unbucketed, "--trainer.logger", "false")[1:]])
    assert not [w for w in caught if "mid-epoch" in str(w.message)]
    with pytest.warns(UserWarning, match=r"the checkpoint was written mid-epoch with bucket_by_length=True"):
        main(fit_args(corpus, run, *unbucketed, "--trainer.max_steps", "3"))


def test_a_new_run_over_an_earlier_runs_checkpoints_is_refused(corpus, tmp_path):
    # best.ckpt and last.ckpt have fixed names: forgetting --ckpt_path last must not replace a trained model
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))
    before = (run / "checkpoints/last.ckpt").read_bytes()
    with pytest.raises(SystemExit, match=r"run/checkpoints holds the checkpoints of an earlier run \(.*last.ckpt"):
        main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    assert (run / "checkpoints/last.ckpt").read_bytes() == before


def test_overwrite_refusal_covers_every_checkpoint_folder_and_lets_resumes_through(tmp_path):
    root, other = tmp_path / "run", tmp_path / "periodic"
    dirpaths = [str(root / "checkpoints"), str(root / "checkpoints"), str(other)]  # the three callbacks' folders
    refuse_to_overwrite(None, str(root), dirpaths)  # nothing there yet
    other.mkdir()
    (other / "epoch19-step480.ckpt").write_bytes(b"")
    for ckpt_path in (None, str(tmp_path / "another_run/last.ckpt")):
        with pytest.raises(ValueError, match=r"periodic.* holds the checkpoints of an earlier run \(epoch19"):
            refuse_to_overwrite(ckpt_path, str(root), dirpaths)
    # continuing this run: `last` and `best` come resolved to their files of the run's folder
    for ckpt_path in (str(root / "checkpoints/last.ckpt"), "hpc", str(other / "epoch19-step480.ckpt")):
        refuse_to_overwrite(ckpt_path, str(root), dirpaths)
    root.mkdir()
    (root / "hpc_ckpt_1.ckpt").write_bytes(b"")  # what a SLURM requeue resumes from, with no --ckpt_path
    refuse_to_overwrite(None, str(root), dirpaths)


@pytest.mark.parametrize("named", ["last", "by-path"])
def test_resuming_with_another_model_shape_is_refused(corpus, tmp_path, named):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))
    before = (run / "checkpoints/last.ckpt").read_bytes()
    deeper = SMALL.replace("num_decoder_layer: 1", "num_decoder_layer: 3")
    refused = r"the checkpoint's model is not this run's: num_decoder_layer=1 \(this run: 3\)"
    # a checkpoint named by its path, which LightningCLI reads the hyperparameters of: refused too, not a resume
    # that drops the flag in silence
    ckpt = "last" if named == "last" else str(run / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit, match=refused):
        main(fit_args(corpus, run, "--trainer.max_steps", "4", "--model.overrides", deeper, "--ckpt_path", ckpt))
    assert (run / "checkpoints/last.ckpt").read_bytes() == before
    # what shapes no weight may change: more positions, for longer examples
    longer = SMALL.replace("max_position_embeddings: 64", "max_position_embeddings: 128")
    main(fit_args(corpus, run, "--trainer.max_steps", "4", "--model.overrides", longer, "--ckpt_path", ckpt))
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_the_checkpoint_is_checked_before_lightning_loads_it(corpus, tmp_path, monkeypatch):
    # Lightning's FSDP loads the weights before on_load_checkpoint runs: a mismatch would be torch's traceback;
    # and under any strategy, nothing is written (a log folder) before the check
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))
    monkeypatch.setattr(Qwen3LightningModule, "on_load_checkpoint", lambda *_: pytest.fail("checked too late"))
    deeper = SMALL.replace("num_decoder_layer: 1", "num_decoder_layer: 3")
    with pytest.raises(SystemExit, match=r"the checkpoint's model is not this run's: num_decoder_layer=1"):
        main(fit_args(corpus, run, "--trainer.max_steps", "4", "--model.overrides", deeper, "--ckpt_path", "last"))
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]


def test_same_size_but_renumbered_vocabulary_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "2"))
    # the same characters, so the same vocabulary size, but other frequencies: other ids
    shuffled = write(tmp_path / "shuffled.txt", "\n\n".join(p[::-1] + p[0] * 5 for p in POEMS * 2))
    with pytest.raises(
        SystemExit,
        match=r"the checkpoint's vocabulary has 77 tokens, but this run's data gives 77 \(the same size, in another "
        r"order\): resuming would renumber characters",
    ):
        main(fit_args(corpus, run, "--trainer.max_steps", "4", "--data.train_path", shuffled, "--ckpt_path", "last"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path", "{missing}"], "checkpoint .*missing.ckpt does not exist"),
        (["--ckpt_path", "{text}"], "is not a readable PyTorch checkpoint: it is not a file written by torch.save"),
        (["--temperature", "-0.5"], "temperature=-0.5 must be a finite number >= 0"),
        (["--top_p", "0"], "top_p=0.0 must be a number in"),
        (["--max_new_tokens", "1000"], "exceeds the model's max_position_embeddings=64; ask for at most 63 new"),
        (["--prompt", "春" * 70, "--max_new_tokens", "0"], "the prompt alone is too long: shorten it to at most 62"),
        (["--num_samples", "0"], "num_samples=0 must be at least 1"),
    ],
)
def test_bad_generation_input_is_refused(corpus, tmp_path, args, message):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    paths = {"missing": str(tmp_path / "missing.ckpt"), "text": write(tmp_path / "notes.ckpt", "hello")}
    args = [a.format(**paths) for a in args]
    if "--ckpt_path" not in args:
        args = ["--ckpt_path", str(run / "checkpoints/last.ckpt"), *args]
    with pytest.raises(SystemExit, match=message):
        main(["generate", *args])


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_ckpt_path_that_is_no_checkpoint_is_refused_before_any_work(corpus, tmp_path, subcommand):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    main(["export", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--out_dir", str(tmp_path / "hf")])
    whole = (run / "checkpoints/last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])  # a copy that did not finish
    bad = {
        str(tmp_path / "missing.ckpt"): "checkpoint .*missing.ckpt does not exist",
        str(tmp_path / "cut.ckpt"): "it begins as a file of torch.save does but is cut short or damaged",
        str(run / "checkpoints"): r"checkpoints is a folder; pass one checkpoint file in it \(.*last.ckpt",
        str(tmp_path / "hf"): "hf is an exported transformers model folder, not a training checkpoint",
        write(tmp_path / "notes.ckpt", "some notes about training"): "it is not a file written by torch.save",
    }
    extra = {"test": ["--data.test_path", str(corpus)], "predict": ["--data.predict_path", str(corpus)]}
    other = tmp_path / "other"  # a fresh run folder, so that fit's refusal to overwrite does not answer first
    for ckpt, message in bad.items():
        args = [subcommand, *fit_args(corpus, other)[1:], *extra.get(subcommand, []), "--ckpt_path", ckpt]
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):  # the message, not a traceback
            main(args)
    assert not other.exists()  # nothing written: no log folder, no config.yaml


def test_export_to_a_file_path_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    target = Path(write(tmp_path / "model.bin", "x"))
    with pytest.raises(SystemExit, match="is a file; give the path of a directory"):
        main(["export", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--out_dir", str(target)])
    assert target.read_text() == "x"  # nothing lost


def test_export_over_an_earlier_export_needs_overwrite(corpus, tmp_path):
    run, out = tmp_path / "run", tmp_path / "hf"
    main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    export = ["export", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--out_dir", str(out)]
    main(export)
    (out / "config.json").write_text("{}")  # stands for an earlier export of another model
    with pytest.raises(SystemExit, match=r"hf already holds files \(config.json, .*--overwrite true"):
        main(export)
    assert (out / "config.json").read_text() == "{}"
    main([*export, "--overwrite", "true"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    into_checkpoints = [
        "export",
        "--ckpt_path",
        str(run / "checkpoints/last.ckpt"),
        "--out_dir",
        str(run / "checkpoints"),
    ]
    with pytest.raises(SystemExit, match=r"checkpoints holds training checkpoints \(.*last.ckpt\): the export's files"):
        main([*into_checkpoints, "--overwrite", "true"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    # readable by whoever can read the other files (safetensors itself writes 0600)
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode


def test_generate_on_a_device_that_is_not_there_is_refused(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    main(fit_args(corpus, run, "--trainer.max_steps", "1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # runs on a GPU machine too
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    generate = ["generate", "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--device"]
    with pytest.raises(SystemExit, match="this PyTorch sees no CUDA GPU; use --device cpu"):
        main([*generate, "cuda"])
    with pytest.raises(SystemExit, match=r"device='mps', but this PyTorch has no Apple GPU \(MPS\) here"):
        main([*generate, "mps"])
    with pytest.raises(SystemExit, match=r"device=.gpu. is not a device: use cpu, cuda, cuda:N \(the N-th GPU\), mps"):
        main([*generate, "gpu"])
    with pytest.raises(SystemExit, match=r"device='meta' is not a device"):  # a torch device, but not for this
        main([*generate, "meta"])


def test_lightnings_learning_rate_finder_sweeps_from_its_own_minimum(tmp_path):
    data = TextDataModule(texts=POEMS * 4, val_split=0, max_length=32, batch_size=2)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 32})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    finder = L.pytorch.tuner.Tuner(trainer).lr_find(model, datamodule=data, min_lr=1e-6, max_lr=1e-2, num_training=6)
    rates = finder.results["lr"]
    # a sweep up from min_lr, not from the module's learning rate (3e-4)
    assert rates[0] == pytest.approx(1e-6) and rates[1] < 1e-4 and rates == sorted(rates) and len(rates) >= 5


def test_a_fit_after_the_learning_rate_finder_under_the_clis_bar(tmp_path):
    # the finder runs with its own callback alone (no bar); the loss is logged alike in its run and the fit after
    from qwen3_lightning.callbacks import ThrottledProgressBar

    data = TextDataModule(texts=POEMS * 4, val_split=0, max_length=32, batch_size=2)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 32})
    trainer = L.Trainer(
        max_steps=3, logger=False, callbacks=[ThrottledProgressBar()], default_root_dir=tmp_path, limit_val_batches=0
    )
    L.pytorch.tuner.Tuner(trainer).lr_find(model, datamodule=data, num_training=5, update_attr=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3


def test_a_negative_clipping_value_is_refused_from_python_too(tmp_path):
    # bf16-mixed clips in the module itself (Lightning refuses to for a fused optimizer): clip_grad_norm_ with a
    # negative norm turns every gradient around, and the loss would rise
    data = TextDataModule(texts=POEMS * 4, val_split=0, max_length=32, batch_size=2)
    model = Qwen3LightningModule(vocab_size=data.vocab_size, overrides={"num_decoder_layer": 1, "hidden_size": 32})
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=2, precision="bf16-mixed", gradient_clip_val=-1.0)
    with pytest.raises(ValueError, match=r"trainer.gradient_clip_val=-1.0 must be >= 0"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 0
