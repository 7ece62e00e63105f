"""The LightningModule: a Qwen3Transformer plus its loss, AdamW and the warmup-cosine schedule."""

from __future__ import annotations

import difflib
import logging
import math
import os
import signal
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.aggregation import MeanMetric

from qwen3_lightning.callbacks import ThrottledProgressBar
from qwen3_lightning.config import WEIGHT_SHAPE_FIELDS, Qwen3Config
from qwen3_lightning.data import IGNORE_INDEX, vocabulary_mismatch
from qwen3_lightning.generation import UNKNOWN_TEXT, check_generate_kwargs, check_room
from qwen3_lightning.model import Qwen3Transformer, check_token_ids, flops_per_token
from qwen3_lightning.tokenizer import CharTokenizer

log = logging.getLogger(__name__)


def is_sharded(strategy: object) -> bool:
    return type(strategy).__name__.startswith(("FSDP", "ModelParallel", "DeepSpeed"))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then a half cosine down to
    ``min_ratio`` at ``total_steps``, and ``min_ratio`` after that."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def normalize_epoch_progress(fit: dict[str, Any]) -> None:
    """Rewrites a checkpoint's fit-loop counters where Lightning (2.6) would resume them wrongly, into the
    shapes it resumes exactly: an epoch that finished, or one interrupted mid-way (as by SIGTERM).

    - Saved after an epoch's last batch and its end hooks (the end of a run, a SIGTERM there), whether or not
      the epoch counts as completed yet: Lightning would carry the finished epoch's batch count and "last batch"
      flag into the next epoch, or under ``max_steps`` count the finished epoch once more; either way it skips
      an epoch. Now the epoch counts as completed and the next one starts from its first batch.
    - Saved when the run stopped mid-epoch (``max_steps`` reached, or a stop requested), at its end or in the
      epoch-end hooks before: Lightning counts that epoch as completed (or about to be), and a resume with a
      higher ``max_steps`` would start the next epoch, cut short by the batches already run. Now the epoch
      counts as interrupted, and a resume finishes it first.
    - Saved when a stop (Ctrl-C, raised wherever it lands) cut a training batch short, before its optimizer
      step was taken: the batch counts as ready and started but not processed, and the resumed run trains it
      again. Lightning resets only the epoch's count on restart, so the run's total stayed one batch ahead for
      each such stop, and validation every N batches across epochs (``check_val_every_n_epoch: null``) came
      one batch early ever after (the validation due at the interrupted batch was skipped). Now the batch
      counts as not started, in both counts.
    """
    batches = fit["epoch_loop.batch_progress"]
    for counts in (batches["total"], batches["current"]):
        if counts["ready"] > counts["processed"]:
            counts["ready"] = counts["started"] = counts["processed"]
    for epochs in (fit["epoch_progress"]["current"], fit["epoch_progress"]["total"]):
        if batches["is_last_batch"] and epochs["processed"] == epochs["started"]:
            epochs["completed"] = epochs["processed"]
        elif not batches["is_last_batch"] and epochs["processed"] == epochs["started"] and batches["current"]["ready"]:
            epochs["processed"] = epochs["completed"] = epochs["started"] - 1
    if (
        batches["is_last_batch"]
        and fit["epoch_progress"]["current"]["completed"] == fit["epoch_progress"]["current"]["started"]
    ):
        batches["current"].update(dict.fromkeys(batches["current"], 0))
        batches["is_last_batch"] = False


def check_batch(batch: Any) -> None:
    """Refuses a batch that is not what the loss reads: a dict of ``input_ids`` and ``labels`` (optionally
    ``attention_mask``), two integer tensors of one (batch, length) shape."""
    layout = (
        "a dict of input_ids and labels (and optionally attention_mask), integer tensors of one (batch, length) "
        "shape, as TextDataModule's batches are; labels[:, t] is the token after input_ids[:, t] (already "
        "shifted, unlike transformers' labels), -100 where the loss skips a position"
    )
    if not isinstance(batch, Mapping) or not {"input_ids", "labels"} <= batch.keys():
        got = f"a dict of {sorted(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise ValueError(f"Qwen3LightningModule got {got} as a batch; it takes {layout}.")
    ids, labels = batch["input_ids"], batch["labels"]
    for name, t in (("input_ids", ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point() or t.is_complex():
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"the batch's {name} is {got}; Qwen3LightningModule takes {layout}.")
    if ids.shape != labels.shape:
        raise ValueError(
            f"the batch's input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} differ in shape; "
            f"Qwen3LightningModule takes {layout}."
        )


def check_trainer_settings(gradient_clip_val: float | None, accumulate_grad_batches: int) -> None:
    """Refuses the Trainer settings that Lightning takes without a word but that break training: a negative
    clipping value (on paths that clip themselves, it turns every gradient around) and no batches to accumulate
    (a division by zero at the first step)."""
    if gradient_clip_val is not None and not gradient_clip_val >= 0:
        raise ValueError(
            f"trainer.gradient_clip_val={gradient_clip_val} must be >= 0 (the largest gradient norm, or value "
            "with gradient_clip_algorithm=value, kept; 0 or null: no clipping)."
        )
    if accumulate_grad_batches < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} must be at least 1 (the batches each "
            "optimizer step adds up; 1: a step per batch)."
        )


def check_fused_clipping(fused: bool | None, precision: object, gradient_clip_val: float | None) -> None:
    """Refuses ``fused=True`` with clipping under a GradScaler (16-mixed on a GPU), which Lightning would refuse
    only at the first step: the fused AdamW unscales the float16 gradients inside its step, after clipping."""
    # MixedPrecision's GradScaler, or FSDP's ShardedGradScaler (FSDPPrecision is no MixedPrecision)
    if fused and gradient_clip_val and getattr(precision, "scaler", None) is not None:
        raise ValueError(
            f"model.fused=true cannot clip gradients (trainer.gradient_clip_val={gradient_clip_val}) under "
            "trainer.precision=16-mixed: the fused AdamW unscales the float16 gradients inside its step, after "
            "clipping would have to see them. Leave model.fused unset (16-mixed then uses the unfused AdamW), "
            "train in bf16-mixed where the GPU computes bf16 (A100, H100 and later), or set "
            "trainer.gradient_clip_val 0."
        )


def describe_criterion(criterion: nn.Module) -> str:
    """A loss module's class and its plain settings, e.g. ``torch.nn.CrossEntropyLoss(label_smoothing=0.1, ...)``:
    what a checkpoint records of the loss it was trained with (the module itself is not saved)."""
    if not isinstance(criterion, nn.Module):  # a plain function works too
        return f"{getattr(criterion, '__module__', '')}.{getattr(criterion, '__qualname__', repr(criterion))}"
    cls = type(criterion)
    settings = {
        k: v
        for k, v in sorted(vars(criterion).items())
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, type(None)))
    }
    module = cls.__module__.replace("torch.nn.modules.loss", "torch.nn")
    return f"{module}.{cls.__qualname__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def optimizer_settings(hparams: Any) -> dict[str, Any]:
    """The optimizer's and the schedule's hyperparameters among ``hparams``, lists (betas, as a checkpoint stores
    them) as tuples."""
    names = ("learning_rate", "min_lr", "warmup_steps", "weight_decay", "betas", "eps")
    return {name: tuple(v) if isinstance(v := hparams[name], list) else v for name in names if name in hparams}


class Qwen3LightningModule(L.LightningModule):
    """Trains a ``Qwen3Transformer`` on next-token prediction.

    The transformer, ``self.model``, is built by ``configure_model``, which the Trainer calls (under FSDP it is
    built there on the meta device and then sharded); ``forward``, ``load_state_dict`` and
    ``load_from_checkpoint`` build it too. To use the module outside a Trainer, e.g. to build an optimizer over
    ``parameters()``, call ``configure_model()`` first.

    Batches (``training_step``, ``validation_step``, ``test_step``) are dicts of ``input_ids`` and ``labels``
    (optionally ``attention_mask``), integer tensors of shape (batch, length), as ``TextDataModule`` makes them:
    the labels are already shifted (``labels[:, t]`` is the token after ``input_ids[:, t]``), and -100 marks
    the positions the loss skips (padding). ``predict_step`` takes a ``TextDataModule``'s prompt batches.

    Args:
        preset: the model shape to start from (``Qwen3Config.from_preset``): tiny, small, medium, large,
            qwen3-0.6b, qwen3-1.7b.
        overrides: ``Qwen3Config`` fields that replace the preset's, e.g. ``{num_decoder_layer: 8}``.
        vocab_size: size of the vocabulary; the CLI takes it from the DataModule.
        learning_rate: peak learning rate, reached at the end of warmup.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: optimizer steps of linear warmup; a float below 1 is a fraction of all steps.
        weight_decay: AdamW weight decay of the matrices (norms, biases and embeddings get none).
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        fused: AdamW's fused kernel; None uses it on CPU and CUDA, except under a sharded strategy (FSDP) or
            16-mixed precision.
        criterion: the loss, called as ``criterion(logits (N, vocab), labels (N,))`` with padding labelled
            -100; default ``nn.CrossEntropyLoss()``. In YAML: ``class_path`` and ``init_args`` of any nn.Module.
            Not among the saved hyperparameters (a module): ``load_from_checkpoint`` takes it again as an
            argument, and warns when the checkpoint was trained with another.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        compile: ``torch.compile`` in training, validation and test. ``True``: the steps' model and loss as one
            graph, as ``trainer.fit(torch.compile(module))`` compiles them, the fastest on one device (in the
            benchmark), but compiled again for each new kind of batch shape; under a sharded strategy (FSDP),
            each decoder layer instead, as FSDP needs. ``"layers"``: each decoder layer alone, whatever the
            strategy: one layer's graph, reused by every layer, so the first steps come sooner.
        initial_checkpoint: a training checkpoint (.ckpt), or a directory written by ``export``, whose weights
            the model starts from, to fine-tune it on other text: a new run, with a fresh optimizer, schedule
            and step count. Its model must have this one's shape and vocabulary (the CLI takes both from it:
            ``model.preset`` and ``model.overrides``, and ``data.tokenizer_path``). A resumed run (``ckpt_path``)
            takes its weights from that checkpoint; the CLI then does not read this file (so it may be gone).
            Checkpoints record it as ``initialized_from``, and as null among the hyperparameters, so that
            loading them never reads it again.
        generate_kwargs: sampling settings of the ``predict`` subcommand, passed to ``Qwen3Transformer.generate``:
            max_new_tokens, temperature, top_k, top_p, compile (default ``{max_new_tokens: 100,
            temperature: 0.8, top_k: 50}``, ``generation.GENERATE_DEFAULTS``).
    """

    #: the metrics ``self.log`` records in fit, which a checkpoint or early stopping may monitor
    LOGGED: tuple[str, ...] = ("train_loss", "tokens_seen", "val_loss", "val_ppl")

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        vocab_size: int = 1000,
        learning_rate: float = 3e-4,
        min_lr: float = 3e-5,
        warmup_steps: int | float = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused: bool | None = None,
        criterion: nn.Module | None = None,
        gradient_checkpointing: bool = False,
        compile: bool | Literal["layers"] = False,
        initial_checkpoint: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if overrides and overrides.get("vocab_size", vocab_size) != vocab_size:  # warned, not refused: checkpoints
            rank_zero_warn(  # written before 2026-12-01 may carry one, which was ignored then too
                f"overrides.vocab_size={overrides['vocab_size']} is ignored: the vocabulary's size is the vocab_size "
                f"argument ({vocab_size}; the command line takes it from the data). Pass vocab_size=... instead."
            )
        # the config is checked here, at construction, so a bad value fails before any data or weights load
        self.config = Qwen3Config.for_vocabulary(preset, overrides, vocab_size)
        if not (learning_rate > 0 and 0 <= min_lr <= learning_rate):  # (NaN fails every comparison)
            raise ValueError(
                f"need 0 <= min_lr <= learning_rate and learning_rate > 0; got learning_rate="
                f"{learning_rate}, min_lr={min_lr}."
            )
        if not warmup_steps >= 0 or (isinstance(warmup_steps, float) and warmup_steps >= 1):
            raise ValueError(f"warmup_steps={warmup_steps} must be a step count (int >= 0) or a fraction in [0, 1).")
        for name, value in (("weight_decay", weight_decay), ("eps", eps)):
            if not value >= 0:  # NaN too
                raise ValueError(f"model.{name}={value} must be >= 0 (AdamW's).")
        if compile not in (False, True, "layers"):
            raise ValueError(f"model.compile={compile!r} must be true, false or 'layers'.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"model.betas={list(betas)} must be two numbers in [0, 1) (AdamW's), e.g. [0.9, 0.95].")
        # generate_kwargs stays out of the checkpoint: LightningCLI would let saved values override the flags
        self.save_hyperparameters(ignore=["criterion", "generate_kwargs"])
        self.generate_kwargs = check_generate_kwargs(generate_kwargs or {})
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.model: Qwen3Transformer | None = None
        self.tokenizer: CharTokenizer | None = None  # a loaded checkpoint's, for predict_step without the DataModule
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.tokens_seen = 0
        self._sigterm = False
        # per batch since the last optimizer step: its counts (on the CPU once the event is reached), the loss
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, torch.Tensor, int]] = []
        self._loss_in_bar = True
        self._schedule: tuple[int, int, float] | None = None
        self._resumed_from: dict[str, Any] | None = None
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._initialized_from: str | None = None  # a resumed checkpoint's initial_checkpoint, kept on saving

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self._is_sharded():
            # no random init on the CPU of a model that is about to be sharded: build on the meta device, then
            # allocate straight on this rank's device and initialize there
            with torch.device("meta"):
                model = Qwen3Transformer(self.config)
            model.to_empty(device=self.trainer.strategy.root_device)
            model.tie_weights()  # to_empty gives the tied embedding and lm_head separate storage; share it again
            model.init_weights()
            self.model = model
        else:
            self.model = Qwen3Transformer(self.config)
        if self.hparams.initial_checkpoint:  # a resumed checkpoint's weights then replace these
            self._load_initial_weights(self.hparams.initial_checkpoint)
        self.model.gradient_checkpointing = self.hparams.gradient_checkpointing
        if self.hparams.compile == "layers" or (self.hparams.compile and self._is_sharded()):
            for layer in self.model.model.layers:
                layer.compile()
        elif self.hparams.compile:  # what trainer.fit(torch.compile(module)) compiles: the steps, whose logging
            for step in ("training_step", "validation_step", "test_step"):  # (torch.compiler.disable) runs eagerly
                setattr(self, step, torch.compile(getattr(self, step)))

    def _load_initial_weights(self, path: str) -> None:
        from qwen3_lightning.interop import model_weights, read_initial_checkpoint

        # a checkpoint is memory-mapped: only the model's weights are read, not the optimizer state beside them
        checkpoint = read_initial_checkpoint(path)
        self.check_initial_checkpoint(checkpoint, path, self.trainer.datamodule if self._trainer else None)
        self.model.load_state_dict(model_weights(checkpoint["state_dict"]))
        rank_zero_info(f"model weights from {path} (model.initial_checkpoint)")

    def check_initial_checkpoint(self, checkpoint: dict[str, Any], path: str, datamodule: Any = None) -> None:
        """Refuses an ``initial_checkpoint`` whose vocabulary is not the one the data is encoded with (this
        package's DataModule), or whose weights do not fit this model, naming what differs."""
        from qwen3_lightning.interop import tokenizer_state

        state = tokenizer_state(checkpoint)  # under the name of the DataModule's class, a subclass's too
        saved = checkpoint.get("hyper_parameters", {}).get("vocab_size")
        ours = getattr(datamodule, "tokenizer", None)
        how = "another size" if saved is not None and saved != self.config.vocab_size else None
        if how is None and state is not None and isinstance(ours, CharTokenizer):
            how = "the same size, in another order" if CharTokenizer.from_dict(state) != ours else None
        if how:
            raise ValueError(
                f"model.initial_checkpoint={path} was trained on another vocabulary ({saved} tokens) than the one "
                f"this run encodes its text with ({self.config.vocab_size} tokens, {how}): its weights would read "
                "other characters. Encode with the checkpoint's: leave data.tokenizer_path unset (the command line "
                "then takes it from the checkpoint), or set it to the checkpoint."
            )
        differ = self._shape_differences(checkpoint)
        if differ:
            raise ValueError(
                f"model.initial_checkpoint={path} holds another model: {', '.join(differ)}. Start from it with the "
                "model settings of the run that wrote it (model.preset and model.overrides in its config.yaml)."
            )

    @property
    def flops_per_batch(self) -> float | None:
        """FLOPs of the last batch, read by Lightning's ``ThroughputMonitor``: forward and backward in training,
        the forward (a third of that) in validation and test."""
        shape = getattr(self, "_last_batch_shape", None)
        if shape is None or self.model is None:
            return None
        flops = flops_per_token(self.config, shape[1]) * shape[0] * shape[1]
        return flops if self.training else flops / 3

    def setup(self, stage: str) -> None:
        if self._trainer:
            # Lightning reads the progress bar's metrics back after every batch, a wait for the GPU; the CLI's bar
            # shows the loss itself, read only when it redraws. Decided here, before Lightning's lr finder takes
            # the callbacks away for its own run: the loss must be logged alike in that run and the fit after it
            self._loss_in_bar = not isinstance(self.trainer.progress_bar_callback, ThrottledProgressBar)
            check_trainer_settings(self.trainer.gradient_clip_val, self.trainer.accumulate_grad_batches)
            check_fused_clipping(self.hparams.fused, self.trainer.precision_plugin, self.trainer.gradient_clip_val)
        datamodule = self.trainer.datamodule if self._trainer else None
        self.check_data(datamodule)
        max_length = getattr(datamodule, "max_length", None)
        if max_length is not None and not self._is_sharded():
            # the model summary at the start of fit runs this through the model to count one sequence's FLOPs
            # (not under FSDP: a forward that bypasses the root wrapper would leave its inner units broken)
            self.example_input_array = torch.zeros(1, max_length, dtype=torch.long)
        if stage == "fit":
            self.check_monitors(self.trainer.callbacks)
        if stage == "predict":
            self.check_prompts(datamodule)

    def check_data(self, datamodule: Any) -> None:
        """Refuses a datamodule whose vocabulary or ``max_length`` this model cannot take (the CLI checks before
        the log folder is made)."""
        data_vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(data_vocab, int) and data_vocab > self.config.vocab_size:
            raise ValueError(
                f"the data's vocabulary has {data_vocab} tokens, more than the model's vocab_size="
                f"{self.config.vocab_size}: the ids past it have no embedding. Build the module with "
                f"vocab_size={data_vocab} (the datamodule's vocab_size; the command line links the two)."
            )
        max_length = getattr(datamodule, "max_length", None)
        if max_length is not None and max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"data.max_length={max_length} is longer than the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}. Lower data.max_length, or raise the model's "
                "max_position_embeddings in model.overrides."
            )

    def check_monitors(self, callbacks: list[L.Callback], warn: bool = True) -> None:
        """Refuses a checkpoint or early-stopping ``monitor`` that misspells a metric this module logs (Lightning
        would stop at the first validation, with no checkpoint saved); warns of one that is not among them
        (``warn``: the CLI checks before the log folder is made, and leaves the warning to ``setup``)."""
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        known = (*self.LOGGED, "epoch", "step")
        for callback in callbacks:
            monitor = getattr(callback, "monitor", None)
            if not isinstance(callback, (ModelCheckpoint, EarlyStopping)) or monitor is None or monitor in known:
                continue
            name = type(callback).__name__
            close = difflib.get_close_matches(monitor, known, n=1)
            if close:
                raise ValueError(
                    f"{name}(monitor={monitor!r}) names no metric of this module; did you mean {close[0]!r}? "
                    f"It logs {', '.join(self.LOGGED)}."
                )
            if warn:
                rank_zero_warn(
                    f"{name}(monitor={monitor!r}) is not among the metrics this module logs "
                    f"({', '.join(self.LOGGED)}); unless a callback or another hook logs it, Lightning stops at "
                    "the first validation."
                )

    def check_prompts(self, datamodule: object) -> None:
        """Refuses prompts (a ``TextDataModule``'s ``predict_path``) that ``generate_kwargs``' max_new_tokens
        would carry past the model's positions: said before the weights load and the prediction file is opened,
        not at the batch that holds the longest prompt."""
        if getattr(datamodule, "predict_path", None) is None or getattr(datamodule, "tokenizer", None) is None:
            return
        prompts = datamodule.prompts
        lengths = [len(datamodule.tokenizer.encode(p)) + 1 for p in prompts]  # (+1: each starts with <bos>)
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        check_room(
            lengths[longest],
            self.generate_kwargs["max_new_tokens"],
            self.config.max_position_embeddings,
            prompt=f"prompt {longest + 1} of {datamodule.predict_path}",
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val and self._is_sharded() and gradient_clip_algorithm in (None, "norm"):
            # Lightning's FSDP precision refuses norm clipping; FSDP's own clip_grad_norm_ computes the norm
            # over all shards of all ranks
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and self._mixed_precision_without_scaler():
            # Lightning refuses to clip for a fused optimizer under any mixed precision, because under float16 the
            # gradients are still scaled then; bf16-mixed has no scaler, so they are true gradients to clip
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _mixed_precision_without_scaler(self) -> bool:
        plugin = self.trainer.precision_plugin
        return isinstance(plugin, MixedPrecision) and plugin.scaler is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.configure_model()  # built already under a Trainer; this is for use outside one
        return self.model(input_ids, attention_mask=attention_mask)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.configure_model()  # the weights need the transformer they belong to
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(batch)
        self._last_batch_shape = tuple(batch["input_ids"].shape)
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        # the loss in float32, as autocast computes it under bf16-mixed: under 16-true or bf16-true the logits
        # are half precision, whose log-softmax and mean over thousands of tokens would be coarse
        loss = self._criterion_loss(logits.flatten(0, 1).float(), batch["labels"].flatten())
        return loss, (batch["labels"] != IGNORE_INDEX).sum()

    def _criterion_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        how = (
            "It is called as criterion(logits of shape (tokens, vocab), labels of shape (tokens,), padding "
            "labelled -100) and must return one number, as nn.CrossEntropyLoss does."
        )
        try:
            loss = self.criterion(logits, labels)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"model.criterion {type(self.criterion).__name__} failed: {err}. {how}") from err
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"model.criterion {type(self.criterion).__name__} returned {shape}, not one number. {how}")
        return loss

    def check_criterion(self) -> None:
        """Calls the loss once on made-up logits and labels (padding among them), so that one that cannot take
        them is refused before a run starts, rather than at its first step (the CLI calls this before the log
        folder is made). Without gradients, as an evaluation: a loss that counts its training calls is not
        thrown off."""
        vocab = self.config.vocab_size
        labels = torch.tensor([0, vocab - 1, IGNORE_INDEX])
        with torch.no_grad():
            logits = torch.randn(len(labels), vocab, generator=torch.Generator().manual_seed(0))
            self._criterion_loss(logits, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        self._account(loss, n_tokens, batch_idx)
        return loss

    @torch.compiler.disable  # bookkeeping: under torch.compile(module) or compile=True, only the loss is compiled
    def _account(self, loss: torch.Tensor, n_tokens: torch.Tensor, batch_idx: int) -> None:
        """Queues this batch's token count and loss check, summed over ranks; ``on_before_optimizer_step`` reads
        them. Reading them here, between the forward and the backward, would make the CPU wait for the GPU to
        finish the forward before it could queue the backward, once per batch."""
        # one reduction tells every rank if any loss broke or any process got SIGTERM, so that all stop together
        # (a rank stopping alone would leave the others waiting for it forever)
        # the flag by a fill, not torch.tensor(flag, device=...): a copy from the host would wait for the GPU too
        sigterm = torch.full((), float(self._sigterm), device=loss.device)
        stats = torch.stack([n_tokens.float(), (~torch.isfinite(loss.detach())).float(), sigterm])
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # not strategy.reduce: Lightning's puts a barrier before it, which blocks the CPU until the GPU is done
            torch.distributed.all_reduce(stats)
        elif self.trainer.world_size > 1:  # a strategy without torch.distributed (XLA)
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        event = None
        if stats.device.type == "cuda":  # copied as the GPU gets there; the CPU goes on queueing the backward
            stats = stats.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((stats, event, loss.detach(), batch_idx))
        self.log("train_loss", loss, on_step=True, prog_bar=self._loss_in_bar)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Counts the tokens of the batches since the last optimizer step and stops the run, before the step,
        when any of their losses broke; marks a SIGTERM that reached any process, so that Lightning stops every
        rank at the end of this batch, with last.ckpt saved. A subclass that overrides this hook calls super()."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        for _, event, _, _ in pending:
            if event is not None:
                event.synchronize()  # the forward of that batch, long done: not the backward queued after it
        window = torch.stack([stats for stats, *_ in pending])  # a row per batch, each summed over ranks
        tokens, (broken, stopping) = window[:, 0].sum().item(), window[:, 1:].amax(0).tolist()
        if stopping:
            self.trainer._signal_connector.received_sigterm = True
        if broken:
            here = next((p for p in pending if not torch.isfinite(p[2])), None)
            what = (
                f"{here[2].item()} at step {self.global_step} (batch {here[3]})"
                if here
                else (f"not finite at step {self.global_step} on another process (finite on rank {self.global_rank})")
            )
            raise FloatingPointError(
                f"the training loss is {what}; broken on {int(broken)} of {self.trainer.world_size} process(es); "
                "stopping "
                "before a broken model is saved. Lower model.learning_rate (now "
                f"{self.hparams.learning_rate}), keep gradient clipping on, use bf16-mixed rather than "
                "16-mixed where the GPU computes bf16 natively (else 32-true), and "
                "check the data. Resume from the last good checkpoint with --ckpt_path."
            )
        self.tokens_seen += int(tokens)
        # a CPU tensor: a number would be copied to the GPU, which waits for the backward to finish; float64
        # keeps the count exact past float32's 16.7M
        self.log("tokens_seen", torch.tensor(self.tokens_seen, dtype=torch.float64), on_step=True, reduce_fx="max")

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MeanMetric, stage: str) -> None:
        loss, n_tokens = self._loss(batch)
        self._record(loss, n_tokens, metric, stage)

    @torch.compiler.disable
    def _record(self, loss: torch.Tensor, n_tokens: torch.Tensor, metric: MeanMetric, stage: str) -> None:
        metric.update(loss, weight=n_tokens)  # token-weighted, reduced over ranks by torchmetrics
        self.log(f"{stage}_loss", metric, prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, "test")

    def on_validation_epoch_start(self) -> None:
        # a fresh state each time: one left by trainer.validate() is an inference tensor, which fit's
        # validation (run under no_grad, not inference mode) may not update in place
        self._fresh(self.val_loss)

    def on_test_epoch_start(self) -> None:
        self._fresh(self.test_loss)

    @staticmethod
    def _fresh(metric: MeanMetric) -> None:
        # in float32: under 16-true or bf16-true Lightning casts the module, metric states included, and a sum
        # of losses weighted by tokens overflows float16 (NaN) and loses 9% in bfloat16 within 100 batches
        metric.set_dtype(torch.float32)
        metric.reset()

    # the metrics are already reduced over ranks; sync_dist averages equal values and spares Lightning's warning
    def on_validation_epoch_end(self) -> None:
        self.log("val_ppl", torch.exp(self.val_loss.compute()), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log("test_ppl", torch.exp(self.test_loss.compute()), sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Continues each prompt of the batch; returns ``{"prompt", "text"}`` records. The batch is one of
        ``TextDataModule.predict_dataloader``'s: ``prompts``, and their ``input_ids`` and ``attention_mask``
        after ``<bos>``, left-padded."""
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError(
                "predict_step needs the vocabulary to write text: predict with a TextDataModule, or load this "
                "module with load_from_checkpoint (it keeps the checkpoint's vocabulary as module.tokenizer)."
            )
        if not isinstance(batch, Mapping) or not {"prompts", "input_ids", "attention_mask"} <= batch.keys():
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"predict_step takes TextDataModule's prompt batches (a dict of prompts, input_ids and "
                f"attention_mask, left-padded: TextDataModule.collate_prompts makes them); got {got}."
            )
        ids = self.model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            eos_token_id=tokenizer.eos_token_id,
            **self.generate_kwargs,
        )
        new = ids[:, batch["input_ids"].shape[1] :].tolist()
        texts = [tokenizer.decode(t, unk=UNKNOWN_TEXT) for t in new]
        return [{"prompt": p, "text": t} for p, t in zip(batch["prompts"], texts, strict=True)]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # by name, not by shape: under FSDP every parameter is a flat 1-D shard
            if p.requires_grad:
                matrix = name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name
                (decay if matrix else no_decay).append(p)
        fused = hp.fused
        if fused is None:  # not under float16 autocast: its scaled gradients could not be clipped before the step
            fused = (
                all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)
                and not self._is_sharded()
                and self.trainer.precision != "16-mixed"
            )
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
            eps=hp.eps,
            fused=fused or None,
        )
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise ValueError("the schedule needs a finite run: set trainer.max_steps or trainer.max_epochs.")
        # the schedule's length is set in on_train_start: until then every step has the peak rate
        scheduler = self._scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _run_length(self) -> float:
        """The run's optimizer steps: those taken so far plus those this run will take. Lightning's estimate
        counts every epoch in this run's steps per epoch, which a run resumed with other processes or another
        batch size did not take (with more processes, the schedule would end early)."""
        trainer = self.trainer
        batches, every = trainer.num_training_batches, trainer.accumulate_grad_batches
        if not math.isfinite(batches) and trainer.max_steps == -1:  # Lightning would count the run as -1 steps
            raise ValueError(
                "the training data loader has no length (an IterableDataset, say), so the number of steps an epoch "
                "takes is unknown and so is the schedule's length: set trainer.max_steps (--trainer.max_steps)."
            )
        if trainer.max_epochs in (None, -1) or not math.isfinite(batches):
            return trainer.estimated_stepping_batches
        fit, epoch, per_epoch = trainer.fit_loop, trainer.current_epoch, math.ceil(batches / every)
        left = 0
        if fit.epoch_progress.current.started > epoch:  # within an epoch (not between two): the steps it has left
            done = fit.epoch_loop.batch_progress.current.processed
            # Lightning steps where its count reaches a multiple of ``every``, and on the epoch's last batch
            left, epoch = (per_epoch - done // every if done < batches else 0), epoch + 1
        total = trainer.global_step + left + max(trainer.max_epochs - epoch, 0) * per_epoch
        return min(total, trainer.max_steps) if trainer.max_steps != -1 else total

    def lr_multiplier(self, step: int) -> float:
        """The learning-rate schedule (``warmup_cosine``) at optimizer step ``step``, once its length is known."""
        if self._schedule is None:
            return 1.0
        return warmup_cosine(step, *self._schedule)

    def on_train_start(self) -> None:
        """Lays out the schedule over this run's length, and sets this run's optimizer settings (learning rate,
        betas, eps, weight decay) over those a resumed checkpoint restored, from the step it resumed at.

        Done here, not in ``configure_optimizers``: asking Lightning for the run's length there makes it build
        the training data loader before it restores a checkpoint's loop state (Lightning issue 20550), and the
        first epoch of a resumed run would then be drawn in the order of epoch 0."""
        self._pending = []  # a window an earlier fit left unfinished (an exception, a stop mid-accumulation)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # 16-mixed on a GPU: the GradScaler skips the steps whose float16 gradients overflow while it finds its
            # scale, the first ones among them, and torch then warns that the schedule stepped before the optimizer
            # did, as if the code had them in the wrong order; here that is expected
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        if self.trainer.world_size > 1:
            self._note_sigterm_without_collectives()
        scheduler = self.lr_schedulers()
        if self._scheduler is None or scheduler is not self._scheduler:
            return  # a subclass's own optimizer, or another's scheduler (Lightning's learning-rate finder)
        total = self._run_length()
        hp = self.hparams
        warmup = round(hp.warmup_steps * total) if isinstance(hp.warmup_steps, float) else hp.warmup_steps
        self._schedule = (warmup, int(total), hp.min_lr / hp.learning_rate)
        if warmup >= total > self.trainer.global_step:
            rank_zero_warn(
                f"model.warmup_steps={hp.warmup_steps} is not shorter than this run's {int(total)} optimizer steps: "
                "the learning rate rises for the whole run (to model.learning_rate at most) and never decays. "
                "Lower model.warmup_steps (a fraction, such as 0.05, is that share of the run)."
            )
        optimizer = self.optimizers(use_pl_optimizer=False)
        scheduler.base_lrs = [hp.learning_rate] * len(optimizer.param_groups)
        rate = hp.learning_rate * self.lr_multiplier(scheduler.last_epoch)
        for group, decay in zip(optimizer.param_groups, (hp.weight_decay, 0.0), strict=True):
            group.update(lr=rate, initial_lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, weight_decay=decay)
        saved = optimizer_settings(self._resumed_from or {})
        self._resumed_from = None
        changed = [
            f"{k}={v} (the checkpoint's: {saved[k]})"
            for k, v in optimizer_settings(self.hparams).items()
            if k in saved and saved[k] != v
        ]
        if changed:
            rank_zero_info(
                f"resumed with other optimizer settings, which apply from this step on: {', '.join(changed)}"
            )

    def _note_sigterm_without_collectives(self) -> None:
        """Under several processes, Lightning (2.6) answers SIGTERM with a broadcast from inside the signal
        handler, which meets the processes' other collectives and hangs the run (seen with gloo) before any
        checkpoint is saved. Its handler is swapped for one that only notes the signal (and passes it to the
        processes this one launched); the next training step's reduction tells every rank, and Lightning stops
        them all at the end of that step, where the checkpoint callbacks save last.ckpt."""
        connector = self.trainer._signal_connector
        handlers = getattr(signal.getsignal(signal.SIGTERM), "signal_handlers", None)
        if not handlers or connector._sigterm_notifier_fn not in handlers:
            return

        def note(signum: int, frame: object) -> None:
            log.info("[rank %d] received SIGTERM: stopping with the other processes after this step", self.global_rank)
            launcher = self.trainer.strategy.launcher
            if not self._sigterm and launcher is not None:
                launcher.kill(signum)
            self._sigterm = True

        handlers[handlers.index(connector._sigterm_notifier_fn)] = note
        # a SIGTERM that Lightning's handler took before the swap (in the sanity check) goes the same way
        self._sigterm |= connector.received_sigterm
        connector.received_sigterm = False
        # Lightning also broadcasts rank 0's flag before every batch, copied from the host and read back: a wait
        # for the GPU at each batch. The training step's reduction carries the flag of every rank instead
        self.trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def _check_first_batch_ids(self, batch: Any, batch_idx: int) -> None:
        """The token ids of each epoch's first batch against the vocabulary (``check_token_ids``): with a
        DataLoader of their own, ids from another tokenizer are said so, not by an IndexError from the embedding."""
        if batch_idx == 0 and isinstance(batch, Mapping):
            check_batch(batch)
            vocab = self.config.vocab_size
            check_token_ids(batch["input_ids"], vocab, "the batch's input_ids")
            check_token_ids(batch["labels"], vocab, "the batch's labels", ignore_index=IGNORE_INDEX)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch_ids(batch, batch_idx)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch_ids(batch, batch_idx)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._check_first_batch_ids(batch, batch_idx)
        if self.global_step == 0 and batch_idx == 0 and isinstance(batch, Mapping):
            self._check_labels_are_shifted(batch)
        loop = self.trainer.fit_loop.epoch_loop
        if self.automatic_optimization and loop._batches_that_stepped != self.global_step:
            # the step the loggers label rows with. Lightning (2.6) adds one to it when it resumes a checkpoint
            # written after its last update (at the end of an epoch or a run, on SIGTERM), and every later row
            # would be labelled one step too high
            loop._batches_that_stepped = self.global_step

    def _check_labels_are_shifted(self, batch: Mapping[str, Any]) -> None:
        """Warns when the first batch's labels are its inputs: transformers' convention (the model shifts them),
        which would train this module, whose labels come shifted, to copy its input."""
        ids, labels = batch.get("input_ids"), batch.get("labels")
        if not (isinstance(ids, torch.Tensor) and isinstance(labels, torch.Tensor) and ids.shape == labels.shape):
            return
        real = labels != IGNORE_INDEX
        if bool(real.any()) and bool((labels == ids)[real].all()):
            rank_zero_warn(
                "the first batch's labels equal its input_ids: this module takes labels already shifted "
                "(labels[:, t] is the token after input_ids[:, t], as TextDataModule makes them), unlike "
                "transformers' models, which shift them inside. As they are, the model learns to copy its input."
            )

    def _is_sharded(self) -> bool:
        """Whether the strategy shards parameters (FSDP), rather than keeping a full copy per rank."""
        return self._trainer is not None and is_sharded(self.trainer.strategy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["criterion"] = describe_criterion(self.criterion)
        # the weights are in this checkpoint now: loading it (load_from_checkpoint, a resume) must not read the
        # initial one again, which may be gone. Where they came from is kept beside.
        hparams = checkpoint.get("hyper_parameters")
        if hparams and hparams.get("initial_checkpoint"):
            checkpoint["initialized_from"] = hparams["initial_checkpoint"]
            checkpoint["hyper_parameters"] = {**hparams, "initial_checkpoint": None}
        elif self._initialized_from:
            checkpoint["initialized_from"] = self._initialized_from
        if not self._is_sharded():
            for state in checkpoint.get("optimizer_states", []):
                self._number_optimizer_state_as_parameters(state)
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if fit:
            normalize_epoch_progress(fit)

    def _number_optimizer_state_as_parameters(self, state: dict[str, Any]) -> None:
        """Renumbers an optimizer state dict's parameters by their position in ``self.parameters()``.

        torch numbers them in the order of the param groups (here: with weight decay, then without), and its
        ``load_state_dict`` goes by the groups' lists, whatever the numbers. But Lightning's FSDP strategy, to
        resume a checkpoint written without FSDP, names them by position in ``parameters()``: with the group
        numbering it would pair each state with another parameter's shape and crash.
        """
        if not state.get("param_groups"):
            return
        position = {id(p): i for i, p in enumerate(self.parameters())}
        optimizer = self.optimizers(use_pl_optimizer=False)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [i for group in state["param_groups"] for i in group["params"]]
        renumber = {old: position[id(p)] for old, p in zip(saved, params, strict=True)}
        state["state"] = {renumber[i]: value for i, value in state["state"].items()}
        for group in state["param_groups"]:
            group["params"] = [renumber[i] for i in group["params"]]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Qwen3LightningModule:
        """Lightning's ``load_from_checkpoint``; a local path is checked first, so that a missing file, a folder
        (a run's checkpoints, an export) or a file that is no checkpoint of this package is named, with what to
        pass instead, rather than by torch's unpickling error."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            from qwen3_lightning.interop import read_checkpoint

            read_checkpoint(checkpoint_path, mmap=True)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from qwen3_lightning.interop import tokenizer_state

        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        state = tokenizer_state(checkpoint)
        if state is not None:
            self.tokenizer = CharTokenizer.from_dict(state, source="the checkpoint")
        saved, ours = checkpoint.get("criterion"), describe_criterion(self.criterion)
        if saved is not None and saved != ours:
            rank_zero_warn(
                f"the checkpoint was trained with the loss {saved}; this module computes {ours}, so its losses are "
                "not the checkpoint's. Pass the same criterion=... (or --model.criterion) to compare them."
            )
        self._initialized_from = checkpoint.get("initialized_from")
        self._resumed_from = checkpoint.get("hyper_parameters") or {}
        self.check_resumable(checkpoint, self.trainer.datamodule if self._trainer else None)

    def check_resumable(self, checkpoint: dict[str, Any], datamodule: object = None) -> None:
        """Refuses a checkpoint whose weights do not fit this model, naming what differs (and the vocabulary's
        source, a ``TextDataModule``'s). Lightning calls ``on_load_checkpoint`` before it loads the weights,
        except under FSDP (after): the CLI then calls this itself, before ``fit``."""
        saved = checkpoint.get("state_dict", {}).get("model.model.embed_tokens.weight")
        if saved is not None and saved.shape[0] != self.config.vocab_size:
            tokenizer_path = getattr(getattr(datamodule, "hparams", None), "tokenizer_path", None)
            raise ValueError(
                vocabulary_mismatch(
                    f"the checkpoint's model has a vocabulary of {saved.shape[0]} tokens",
                    tokenizer_path,
                    str(self.config.vocab_size),
                )
            )
        differ = self._shape_differences(checkpoint)
        if differ:
            raise ValueError(
                f"the checkpoint's model is not this run's: {', '.join(differ)}. Resume with the model settings "
                "the run started with (model.preset and model.overrides in its logs/version_0/config.yaml), or "
                "start a new run in another --trainer.default_root_dir."
            )

    def _shape_differences(self, checkpoint: dict[str, Any]) -> list[str]:
        """The fields that shape the weights, the vocabulary's size aside (checked first, with its own message),
        where a checkpoint's model differs from this one, as ``name=saved (this run: ours)``; others
        (``max_position_embeddings``, say) may change."""
        hparams = checkpoint.get("hyper_parameters") or {}
        if "preset" not in hparams:
            return []
        saved_config = Qwen3Config.for_vocabulary(hparams["preset"], hparams.get("overrides"), self.config.vocab_size)
        return [
            f"{name}={getattr(saved_config, name)!r} (this run: {getattr(self.config, name)!r})"
            for name in WEIGHT_SHAPE_FIELDS
            if getattr(saved_config, name) != getattr(self.config, name)
        ]
