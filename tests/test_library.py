"""The modules used from Python, in a Lightning project of the user's own: the user's LightningModule on
TextDataModule's batches, the user's loaders and optimizer on Qwen3LightningModule, checkpoints loaded back."""

import pickle
import warnings
from types import MappingProxyType
from typing import Any

import lightning as L
import pytest
import torch
from conftest import POEMS, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from qwen3_lightning.data import IGNORE_INDEX, TextDataModule, collate, without_needless_mask
from qwen3_lightning.module import Qwen3LightningModule

SHAPE = {"num_decoder_layer": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
SHAPE |= {"num_key_value_heads": 1, "head_dim": 16}
DOCS = [*POEMS, "短"]  # one short document: its batch is right-padded


def data_and_module(**module_kwargs) -> tuple[TextDataModule, Qwen3LightningModule]:
    data = TextDataModule(texts=DOCS, val_split=0, max_length=32, batch_size=3)
    module_kwargs = {"overrides": SHAPE, "vocab_size": data.vocab_size, "warmup_steps": 0, **module_kwargs}
    return data, Qwen3LightningModule(**module_kwargs)


class KeyRecorder(L.LightningModule):
    """Another project's module: it reads the mask from TextDataModule's batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.keys: list[set[str]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.keys.append(set(batch))
        return self.layer(batch["attention_mask"][:, :1].float()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Qwen3KeyRecorder(Qwen3LightningModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.keys = [*getattr(self, "keys", []), set(batch)]
        return super().training_step(batch, batch_idx)


class OwnHook(TextDataModule):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return super().on_before_batch_transfer(batch, dataloader_idx)


def test_the_cli_class_imports_from_the_package_and_from_its_old_place():
    # a project's own CLI subclasses Qwen3CLI; it moved to lightning_cli so that generate and export start
    # without Lightning, and qwen3_lightning.cli forwards to it
    import qwen3_lightning
    import qwen3_lightning.cli
    from qwen3_lightning.lightning_cli import Qwen3CLI

    assert qwen3_lightning.Qwen3CLI is Qwen3CLI and qwen3_lightning.cli.Qwen3CLI is Qwen3CLI
    assert "Qwen3CLI" in qwen3_lightning.__all__
    with pytest.raises(AttributeError, match="no attribute 'Qwen3Cli'"):
        qwen3_lightning.cli.Qwen3Cli  # noqa: B018


def test_another_module_gets_text_datamodules_batches_whole():
    data, _ = data_and_module()
    recorder = KeyRecorder()
    quiet_trainer(max_epochs=1).fit(recorder, data)
    assert len(recorder.keys) == 3 and all(k == {"input_ids", "labels", "attention_mask"} for k in recorder.keys)
    # Qwen3LightningModule gets them without the mask, which only marks right padding; so from a subclass
    for datamodule in (data, OwnHook(texts=DOCS, val_split=0, max_length=32, batch_size=3)):
        module = Qwen3KeyRecorder(overrides=SHAPE, vocab_size=datamodule.vocab_size)
        quiet_trainer(max_epochs=1).fit(module, datamodule)
        assert len(module.keys) == 3 and all(k == {"input_ids", "labels"} for k in module.keys)


def test_right_padding_needs_no_mask_and_left_padding_keeps_it():
    data, module = data_and_module(overrides={**SHAPE, "num_decoder_layer": 2})
    module.configure_model()
    batch = collate([data.train_dataset[i] for i in (0, 1, 8)])  # the last row is right-padded
    assert not batch["attention_mask"].all()
    moved = without_needless_mask(batch)
    assert "attention_mask" not in moved
    grads = []
    for b in (batch, moved):  # the same loss and gradients with and without the mask
        module.zero_grad()
        loss, _ = module._loss(b)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    assert "attention_mask" in without_needless_mask(left)
    # padding with labels the loss counts: what the model computes there matters, so the mask stays
    counted = dict(batch, labels=batch["labels"].clamp(min=0))
    assert "attention_mask" in without_needless_mask(counted)
    # any mapping is a batch (transformers' BatchEncoding is one)
    assert torch.equal(module._loss(MappingProxyType(batch))[0], grads[0][0])


class OwnOptimizer(Qwen3LightningModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_subclass_with_its_own_optimizer_and_no_schedule_trains_at_its_own_rate():
    data, _ = data_and_module()
    module = OwnOptimizer(overrides=SHAPE, vocab_size=data.vocab_size)
    quiet_trainer(max_steps=2).fit(module, data)
    assert module.global_step == 2
    assert [g["lr"] for g in module.optimizers(use_pl_optimizer=False).param_groups] == [0.05]


def test_a_model_smaller_than_the_datas_vocabulary_is_refused_before_training():
    data, _ = data_and_module()
    module = Qwen3LightningModule(overrides=SHAPE, vocab_size=data.vocab_size - 1)
    with pytest.raises(ValueError, match=rf"the data's vocabulary has {data.vocab_size} tokens, more than the model"):
        quiet_trainer(max_steps=1).fit(module, data)
    assert module.global_step == 0
    # ignored, as it always was (older checkpoints may hold one), but now said
    with pytest.warns(UserWarning, match=r"overrides.vocab_size=50 is ignored: the vocabulary's size is"):
        assert Qwen3LightningModule(overrides={"vocab_size": 50}, vocab_size=1000).config.vocab_size == 1000


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"learning_rate": float("nan")}, r"learning_rate > 0; got learning_rate=nan"),
        ({"min_lr": float("nan")}, r"need 0 <= min_lr <= learning_rate .* min_lr=nan"),
        ({"min_lr": 1.0}, r"need 0 <= min_lr <= learning_rate .* min_lr=1.0"),
        ({"warmup_steps": float("nan")}, r"warmup_steps=nan must be a step count"),
        ({"warmup_steps": -1}, r"warmup_steps=-1 must be a step count"),
    ],
)
def test_schedule_settings_that_no_run_could_follow_are_refused(setting, message):
    # NaN fails every comparison: a NaN min_lr turned the rate NaN after warmup, and the run stopped on a NaN loss
    with pytest.raises(ValueError, match=message):
        Qwen3LightningModule(overrides=SHAPE, **setting)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ((torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)), "got a tuple as a batch"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, r"got a dict of \['input_ids'\] as a batch"),
        ({"input_ids": torch.ones(2, 4), "labels": torch.ones(2, 4, dtype=torch.long)}, "input_ids is torch.float32"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}, "differ"),
        ({"input_ids": torch.ones(8, dtype=torch.long), "labels": torch.ones(8, dtype=torch.long)}, r"shape \(8,\)"),
    ],
    ids=["tuple", "no-labels", "float-ids", "shapes", "one-dimensional"],
)
def test_a_batch_of_another_layout_gets_a_clear_error(batch, message):
    _, module = data_and_module()
    with pytest.raises(ValueError, match=message) as error:
        module.training_step(batch, 0)
    assert "labels[:, t] is the token after input_ids[:, t]" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("input_ids", 7, r"the batch's input_ids hold the token id 7, outside the model's vocabulary of 6 \(ids 0 "
         r"to 5\): they come from a tokenizer with more tokens than the model has: build the model with vocab_size 8"),
        ("labels", 9, r"the batch's labels hold the token id 9, outside .* \(ids 0 to 5; -100 marks a position the "
         r"loss skips\): .* vocab_size 10 or more"),
        ("input_ids", -100, r"input_ids hold the token id -100, .* negative ids are no tokens: pad input_ids with a "
         r"real token"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_token_ids_beyond_the_vocabulary_are_named_before_the_model_runs(key, value, message, stage):
    # another tokenizer's ids in a loader of one's own: the embedding would raise an IndexError from inside torch
    # (on CUDA a device-side assert), and cross_entropy "Target 9 is out of bounds"
    module = Qwen3LightningModule(overrides=SHAPE, vocab_size=6, warmup_steps=0)
    ids = torch.tensor([[2, 4, 5, 1]])
    batch = {"input_ids": ids, "labels": torch.tensor([[4, 5, 1, IGNORE_INDEX]])}
    batch[key] = batch[key].clone()
    batch[key][0, 1] = value
    loader = DataLoader([batch], batch_size=None)
    trainer = quiet_trainer(max_steps=1)
    before = None
    with pytest.raises(ValueError, match=message):
        if stage == "fit":
            module.configure_model()
            before = [p.detach().clone() for p in module.parameters()]
            trainer.fit(module, loader)
        else:
            getattr(trainer, stage)(module, loader)
    if before is not None:  # refused before the first optimizer step
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    in_range = {"input_ids": ids, "labels": torch.tensor([[4, 5, 1, IGNORE_INDEX]])}
    getattr(quiet_trainer(max_steps=1), stage)(module, DataLoader([in_range], batch_size=None))  # taken
    with pytest.raises(ValueError, match=r"the prompts \(input_ids\) hold the token id 6, outside the model's vocab"):
        module.model.generate(torch.tensor([[2, 6]]), 2)


def test_unshifted_labels_are_flagged_at_the_first_step():
    data, module = data_and_module()
    batches = [collate([data.train_dataset[i] for i in range(3)])]
    unshifted = [b["input_ids"].masked_fill(b["labels"] == IGNORE_INDEX, IGNORE_INDEX) for b in batches]
    transformers_style = [dict(b, labels=labels) for b, labels in zip(batches, unshifted, strict=True)]
    with pytest.warns(UserWarning, match="the first batch's labels equal its input_ids"):
        quiet_trainer(max_steps=1).fit(module, DataLoader(transformers_style, batch_size=None))
    _, module = data_and_module()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*labels equal")
        quiet_trainer(max_steps=1).fit(module, DataLoader(batches, batch_size=None))


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of a capped vocabulary, trained with label smoothing."""
    data = TextDataModule(texts=DOCS, val_split=0, max_length=32, batch_size=3, vocab_size=30)
    module = Qwen3LightningModule(
        overrides=SHAPE, vocab_size=data.vocab_size, criterion=nn.CrossEntropyLoss(label_smoothing=0.3)
    )
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    return tmp_path / "model.ckpt", data


def test_a_datamodule_loaded_from_a_checkpoint_has_its_vocabulary(checkpoint):
    path, data = checkpoint
    loaded = TextDataModule.load_from_checkpoint(path, texts=DOCS)
    assert data.vocab_size == 30 and loaded.tokenizer == data.tokenizer
    # a URL is Lightning's to read, and the vocabulary is then built again: with its cap given, the same
    assert TextDataModule.load_from_checkpoint(path.as_uri(), texts=DOCS, vocab_size=30).tokenizer == data.tokenizer


def test_a_loaded_module_predicts_from_loaders_of_its_own(checkpoint):
    path, data = checkpoint
    module = Qwen3LightningModule.load_from_checkpoint(path, criterion=nn.CrossEntropyLoss(label_smoothing=0.3))
    assert module.tokenizer == data.tokenizer
    module.generate_kwargs = {"max_new_tokens": 3, "temperature": 0}
    loader = DataLoader(["春眠", "床前明月"], batch_size=2, collate_fn=data.collate_prompts)
    (records,) = quiet_trainer().predict(module, loader)
    assert [r["prompt"] for r in records] == ["春眠", "床前明月"] and all(len(r["text"]) == 3 for r in records)
    module.tokenizer = None
    with pytest.raises(ValueError, match="predict_step needs the vocabulary to write text"):
        quiet_trainer().predict(module, loader)


def test_loading_what_is_no_checkpoint_names_it(checkpoint, tmp_path):
    path, _ = checkpoint
    (tmp_path / "notes.txt").write_text("春眠不觉晓", encoding="utf-8")
    for bad, error, message in [
        (tmp_path / "gone.ckpt", FileNotFoundError, r"checkpoint .*gone.ckpt does not exist. Its folder holds model"),
        (tmp_path, ValueError, r"is a folder; pass one checkpoint file in it \(model.ckpt\)"),
        (tmp_path / "notes.txt", ValueError, r"notes.txt is not a readable PyTorch checkpoint: it is not a file"),
    ]:
        with pytest.raises(error, match=message):  # not torch's UnpicklingError, nor a bare IsADirectoryError
            Qwen3LightningModule.load_from_checkpoint(bad)
    assert Qwen3LightningModule.load_from_checkpoint(path.as_uri()).config.vocab_size == 30  # a URL: Lightning's


def test_loading_with_another_loss_than_the_checkpoints_is_flagged(checkpoint):
    path, _ = checkpoint
    with pytest.warns(UserWarning, match=r"trained with the loss torch.nn.CrossEntropyLoss\(.*label_smoothing=0.3"):
        Qwen3LightningModule.load_from_checkpoint(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained with the loss")
        Qwen3LightningModule.load_from_checkpoint(path, criterion=nn.CrossEntropyLoss(label_smoothing=0.3))


def test_a_module_outside_a_trainer_builds_its_model_when_first_used(checkpoint):
    path, _ = checkpoint
    state = torch.load(path, weights_only=True)["state_dict"]
    module = Qwen3LightningModule(overrides=SHAPE, vocab_size=30)
    module.load_state_dict(state)
    assert torch.equal(module.model.lm_head.weight, state["model.lm_head.weight"])
    fresh = Qwen3LightningModule(overrides=SHAPE, vocab_size=30)
    assert fresh(torch.ones(1, 4, dtype=torch.long)).shape == (1, 4, 30)


def test_the_datamodule_pickles_after_a_fit():
    data, module = data_and_module()
    quiet_trainer(max_steps=1).fit(module, data)
    again = pickle.loads(pickle.dumps(data))
    assert again.tokenizer == data.tokenizer
    assert [len(x) for x, _ in again.train_dataset] == [len(x) for x, _ in data.train_dataset]


class Stream(torch.utils.data.IterableDataset):
    """Batches with no length, as a user's streaming loader gives them."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_a_loader_without_length_needs_max_steps_for_the_schedule():
    data, module = data_and_module(warmup_steps=2, min_lr=1e-5)
    data.setup("fit")
    stream = DataLoader(Stream(list(data.train_dataloader())), batch_size=None)
    # Lightning counts such a run, with max_epochs alone, as -1 steps: the rate would drop to min_lr after warmup
    with pytest.raises(ValueError, match=r"the training data loader has no length .* set trainer.max_steps"):
        quiet_trainer(max_epochs=1).fit(module, stream)
    data, module = data_and_module(warmup_steps=2, min_lr=1e-5)
    trainer = quiet_trainer(max_steps=8)
    trainer.fit(module, DataLoader(Stream(list(data.train_dataloader()) * 4), batch_size=None))
    assert trainer.global_step == 8 and module._schedule == (2, 8, 1e-5 / module.hparams.learning_rate)


def fit_two_steps(wrap: Any = None, **module_kwargs: Any) -> tuple[Qwen3LightningModule, dict[str, Any]]:
    torch.manual_seed(0)
    data = TextDataModule(texts=DOCS, val_split=0.3, max_length=32, batch_size=3)
    module = Qwen3LightningModule(overrides=SHAPE, vocab_size=data.vocab_size, warmup_steps=0, **module_kwargs)
    trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=1)
    trainer.fit(wrap(module) if wrap else module, data)
    return module, trainer.callback_metrics


@pytest.fixture(scope="module")
def eager_two_steps() -> tuple[Qwen3LightningModule, dict[str, Any]]:
    return fit_two_steps()


@pytest.mark.parametrize(
    ("how", "wrap", "compile"),
    [
        ("torch.compile(module)", torch.compile, False),
        ("compile=True", None, True),
        ("compile='layers'", None, "layers"),
    ],
)
def test_compiled_training_and_validation_follow_the_eager_run(how, wrap, compile, eager_two_steps):
    """``trainer.fit(torch.compile(module))``, as Lightning's docs show it (the loss is compiled, the logging
    around it is not: Dynamo failed inside ``self.log``), and the module's own ``compile`` option: the weights
    and the losses follow the eager run's."""
    eager, eager_metrics = eager_two_steps  # one eager run for the three
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_metrics = fit_two_steps(wrap, compile=compile)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, how  # something was compiled
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for key in ("train_loss", "val_loss"):
        torch.testing.assert_close(compiled_metrics[key], eager_metrics[key], rtol=1e-4, atol=1e-5, msg=key)
