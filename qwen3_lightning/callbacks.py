"""Callbacks: the checkpoints (best, last, periodic), text samples during training, the throughput monitor wired
for this module's batches, and the writer of ``predict``'s generations."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qwen3_lightning.generation import GENERATE_DEFAULTS

log = logging.getLogger(__name__)


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Computed token positions (padding included), what the hardware spends time on."""
    return batch["input_ids"].numel()


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with two changes for runs that are resumed.

    - ``last.ckpt`` is also written when training ends between two validations (at ``max_steps``, say):
      Lightning skips it there once any checkpoint was saved, and a resume with ``--ckpt_path last`` would then
      repeat the steps since.
    - A run folder that was moved or copied (a renamed project, runs carried to a GPU machine) keeps its best
      score: Lightning keeps it only where the folder's absolute path is the one saved, and would otherwise
      replace ``best.ckpt`` with the next validation's model, however much worse.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath and self._holds_the_files_of(state_dict):
            state_dict = {**state_dict, "dirpath": self.dirpath, **self._moved_paths(state_dict)}
        super().load_state_dict(state_dict)

    def _holds_the_files_of(self, state_dict: dict[str, Any]) -> bool:
        """Whether this folder holds the files the saved one did (if any): the same run's folder, moved. (A
        resume into another run's folder is refused before; a new folder holds none, and starts a new best; so
        do paths this system cannot read as the saved folder's, such as another OS's.)"""
        saved = Path(state_dict["dirpath"])
        paths = [Path(p) for p in [*state_dict.get("best_k_models", {}), state_dict.get("best_model_path")] if p]
        return all(p.parent == saved and (Path(self.dirpath) / p.name).is_file() for p in paths)

    def _moved_paths(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The saved paths that lay in the saved folder, as the same names in this one."""

        def here(path: str) -> str:
            inside = path and Path(path).parent == Path(state_dict["dirpath"])
            return str(Path(self.dirpath) / Path(path).name) if inside else path

        keys = [k for k in ("best_model_path", "kth_best_model_path", "last_model_path") if k in state_dict]
        moved: dict[str, Any] = {key: here(state_dict[key]) for key in keys}
        moved["best_k_models"] = {here(p): score for p, score in state_dict.get("best_k_models", {}).items()}
        return moved


class _EveryNSteps(L.Callback):
    """Tells the training batches after which a callback acts every ``n`` optimizer steps: those that took an
    optimizer step landing on a multiple of ``n``. With gradient accumulation, the batches within a window end
    at the previous step's count, so the step is noted at each batch's start to tell them apart."""

    _step_before = -1

    def _check_every(self, name: str, n: int | None) -> None:
        if n is not None and n < 0:
            raise ValueError(
                f"{type(self).__name__}: {name}={n} must be a number of optimizer steps >= 1 (0 or None: never)."
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_before = trainer.global_step

    def _stepped_onto_multiple(self, trainer: L.Trainer, n: int | None) -> bool:
        step = trainer.global_step
        return bool(n) and step != self._step_before and step % n == 0


class ResumeCheckpoint(_EveryNSteps):
    """Keeps ``last.ckpt`` fresh between validations: every ``every_n_train_steps`` optimizer steps, and when
    the run is stopped from outside (SIGTERM, what schedulers send before preemption, or Ctrl-C). Not on
    errors such as a NaN loss, so a broken state never replaces a good one.

    Args:
        every_n_train_steps: write ``last.ckpt`` this often, mid-epoch included; None: only on interruption.
        dirpath: the checkpoint folder; the CLI sets it to the run's.
    """

    def __init__(self, every_n_train_steps: int | None = None, dirpath: str | None = None) -> None:
        self._check_every("every_n_train_steps", every_n_train_steps)
        self.every_n_train_steps, self.dirpath = every_n_train_steps, dirpath
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        last = dirpath / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(last, weights_only=False)  # a whole checkpoint, optimizer included, to resume
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stepped_onto_multiple(trainer, self.every_n_train_steps):
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # fitting, a validation inside it included (a signal can land there), but not the sanity check
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer)
            rank_zero_warn(
                f"interrupted ({type(exception).__name__}) at step {trainer.global_step}: saved "
                "last.ckpt; resume with --ckpt_path last"
            )


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, redrawn at most every ``min_interval_s`` seconds (and at each loop's last
    batch) rather than after every batch. A redraw reads the logged loss back from the device: on a GPU, after
    every batch, the CPU would wait there for the GPU to finish, and the GPU then idle while the CPU queues the
    next batch. The CLI's default bar; ``refresh_rate`` still thins the redraws further."""

    def __init__(self, min_interval_s: float = 0.5, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.min_interval_s = min_interval_s
        self._drawn_at = -float("inf")
        self._stopping = False

    #: logged by Qwen3LightningModule without ``prog_bar`` under this bar, which shows them: Lightning reads the
    #: progress bar's metrics back after every batch, this bar only when it redraws
    SHOWN = ("train_loss",)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {key: metrics.pop(key) for key in ("v_num",) if key in metrics}
        for key in self.SHOWN:
            value = trainer.callback_metrics.get(key)
            if isinstance(value, torch.Tensor):
                shown[key] = value.item()
        return {**shown, **metrics}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # the run's last batch is drawn too (max_steps, early stopping, SIGTERM), or the bar would end behind it
        last = 0 <= trainer.max_steps <= trainer.global_step
        self._stopping = trainer.should_stop or trainer.received_sigterm or last
        super().on_train_batch_end(trainer, pl_module, *args)
        self._stopping = False

    def _should_update(self, current: int, total: int) -> bool:
        if not super()._should_update(current, total):
            return False
        now = time.monotonic()
        if current != total and not self._stopping and now - self._drawn_at < self.min_interval_s:
            return False
        self._drawn_at = now
        return True


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor, counting the tokens of this project's batches: logs tokens/s and MFU from
    the module's ``flops_per_batch`` once ``window_size`` batches are in. MFU is over a peak in the run's compute
    dtype: on a CPU, a matmul timed at setup (a fraction of a second); on data-center GPUs in bf16 or float16,
    the datasheet's dense tensor-core peak (``gpu_bf16_peak``); elsewhere, Lightning's table. With several
    processes on one CPU each times its matmul while the others do too, so MFU there is approximate."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.window_size = window_size
        self._untimed: dict[RunningStage, tuple[int, float]] = {}  # batches counted since the last timing, FLOPs
        self._sparing = False

    #: the stages timed sparingly on a GPU (``times_every_batch``); test and predict time every batch
    SPARED = (RunningStage.TRAINING, RunningStage.VALIDATING)

    def times_every_batch(self, trainer: L.Trainer) -> bool:
        """Timing a batch on a GPU takes ``torch.cuda.synchronize()``: the CPU stops queueing work until the GPU is
        done, and the GPU then idles while the CPU gets the next batch going. There, training batches are only
        counted, and timed at those whose throughput is logged (every ``log_every_n_steps``), as litgpt does;
        the window then spans about ``window_size`` batches. Validation batches likewise, and the validation's
        end. Elsewhere, every batch is timed."""
        return trainer.strategy.root_device.type != "cuda"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._sparing = not self.times_every_batch(trainer)
        peak = self._peak(trainer)
        with warnings.catch_warnings():
            if peak is not None:  # Lightning's "FLOPs not found for <GPU>", for GPUs this class knows
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        for spared in self.SPARED if self._sparing else ():
            if spared in self._throughputs:  # entries log_every_n_steps apart
                every = max(1, trainer.log_every_n_steps or 1)
                kwargs = {**self.kwargs, "window_size": max(2, -(-self.window_size // every) + 1)}
                self._throughputs[spared] = Throughput(world_size=trainer.world_size, **kwargs)
        if peak is not None:
            self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        if self._batches[trainer.state.stage] == 0:  # a reset
            self._untimed[trainer.state.stage] = (0, 0.0)

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        self._lengths[stage] += batch_tokens(batch)
        self._samples[stage] += batch_size(batch)
        self._batches[stage] += 1
        batches, flops = self._untimed.get(stage, (0, 0.0))
        self._untimed[stage] = (batches + 1, flops + (getattr(pl_module, "flops_per_batch", None) or 0.0))
        if not self._sparing or stage not in self.SPARED or self._logs_now(trainer, stage):
            self._time(trainer, stage)

    @staticmethod
    def _logs_now(trainer: L.Trainer, stage: RunningStage) -> bool:
        """Whether this batch's throughput is logged (ThroughputMonitor's own condition)."""
        training = stage == RunningStage.TRAINING
        return trainer._logger_connector.should_update_logs and not (training and trainer.fit_loop._should_accumulate())

    def _time(self, trainer: L.Trainer, stage: RunningStage) -> None:
        """An entry of the window: the time now, the counts so far, the FLOPs since the last entry."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        flops = self._untimed[stage][1]
        self._untimed[stage] = (0, 0.0)
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=flops or None,
        )

    def _time_the_rest(self, trainer: L.Trainer, stage: RunningStage) -> None:
        """Times the batches of ``stage`` counted since its last entry, if any (never in the sanity check)."""
        if not trainer.sanity_checking and self._untimed.get(stage, (0, 0.0))[0] and stage in self._t0s:
            self._time(trainer, stage)

    # Lightning sets the training clock forward by the validation, from the last entries of both: the training
    # batches before a validation, and the validation itself, end timed
    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._time_the_rest(trainer, RunningStage.TRAINING)
        super().on_validation_start(trainer, *args)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._time_the_rest(trainer, RunningStage.VALIDATING)
        super().on_validation_end(trainer, *args)

    @staticmethod
    def _peak(trainer: L.Trainer) -> float | None:
        device, precision = trainer.strategy.root_device, str(trainer.precision)
        if device.type == "cuda" and precision in ("bf16-mixed", "bf16-true", "16-mixed", "16-true"):
            return gpu_bf16_peak(torch.cuda.get_device_name(device))
        dtype = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}.get(precision)
        if device.type != "cpu" or dtype is None:
            return None
        peak = matmul_flops(dtype)
        # native bf16 (AVX512-BF16, AMX) runs at about twice the float32 rate, emulated bf16 at a fraction of it:
        # half leaves room for a noisy timing either way
        if dtype == torch.bfloat16 and peak < 0.5 * (float32 := matmul_flops(torch.float32)):
            rank_zero_warn(
                f"trainer.precision={precision} is slower than float32 on this CPU: its bf16 matmuls ran at "
                f"{peak / 1e9:.3g} GFLOP/s, float32 ones at {float32 / 1e9:.3g} GFLOP/s (no native bf16 here: "
                "AVX512-BF16 or AMX). Train with --trainer.precision 32-true on it; bf16 pays on GPUs."
            )
        return peak


def gpu_bf16_peak(device_name: str) -> float | None:
    """Dense bf16 (and float16) tensor-core FLOP/s from NVIDIA's datasheets, by ``torch.cuda.get_device_name``.

    Sources: the H100, H200 and A100 datasheets (their tables give "with sparsity" figures, twice these).
    Lightning's table (2.6) does not match the H200 SXM's name ("NVIDIA H200") and, for the NVL parts, holds
    figures of twice the dense peak or more. None for GPUs not listed here.
    """
    name = device_name.lower()
    if "h100" in name or "h200" in name:  # GH200 too: an H100/H200 chip with a Grace CPU
        if "nvl" in name:
            return 835e12
        if "pcie" in name or "hbm2e" in name:  # "NVIDIA H100 80GB HBM2e" is a PCIe card too
            return 756e12
        return 989e12  # SXM: "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    if "a100" in name:
        return 312e12
    return None


def matmul_flops(dtype: torch.dtype, n: int = 1024, reps: int = 5, budget_s: float = 1.0) -> float:
    """FLOP/s of the fastest of up to four rounds of ``reps`` (n x n) @ (n x n) matmuls on the CPU, after one
    warmup matmul: what its matrix units reach in ``dtype``, the peak that MFU is measured against there. Rounds
    stop once ``budget_s`` seconds are spent, and a slow dtype (bf16 without native support: seconds a matmul)
    gets fewer matmuls a round, so the timing never holds up a run for long."""
    g = torch.Generator().manual_seed(0)  # not the global generator: timing must not change the run's random draws
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    start = time.perf_counter()
    torch.mm(a, b)
    one = time.perf_counter() - start
    if one >= budget_s:  # one matmul spent the budget: its rate is the answer, if a little low
        return 2 * n**3 / one
    reps = max(1, min(reps, int(budget_s / 4 / one)))
    best, spent = float("inf"), 0.0
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= budget_s:
            break
    return 2 * n**3 * reps / best


class TextSampler(_EveryNSteps):
    """Writes a few generations from fixed prompts at each validation (or every ``every_n_steps``), to the
    console, to ``samples.jsonl`` beside the metrics, and to TensorBoard when it is a logger. Rank 0 only.

    Args:
        prompts: texts to continue; an empty string starts from ``<bos>``.
        max_new_tokens: length of each sample.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only.
        every_n_steps: sample every this many optimizer steps instead of at each validation.
        seed: seed of the sampling, so samples at different steps are comparable.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = GENERATE_DEFAULTS["temperature"],
        top_k: int | None = GENERATE_DEFAULTS["top_k"],
        every_n_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self._check_every("every_n_steps", every_n_steps)
        self.prompts = prompts if prompts is not None else [""]
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.every_n_steps, self.seed = every_n_steps, seed
        self._last_step = -1
        self.enabled = True

    def check_prompts(self, max_position_embeddings: int) -> None:
        """Refuses prompts that leave a model of ``max_position_embeddings`` no room to write."""
        too_long = [p for p in self.prompts if len(p) + 1 >= max_position_embeddings]  # +1: <bos>
        if too_long:
            raise ValueError(
                f"sampler.prompts {too_long} leave no room to generate within the model's "
                f"max_position_embeddings={max_position_embeddings}; shorten them."
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from qwen3_lightning.module import is_sharded

        self.enabled = not is_sharded(trainer.strategy)
        if stage != TrainerFn.FITTING:  # samples are written during fit only
            return
        self.check_prompts(pl_module.config.max_position_embeddings)  # on every rank: none fails alone later
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        unknown = "".join(sorted(tokenizer.unknown_chars("".join(self.prompts)))) if tokenizer else ""
        if self.enabled and unknown:  # the configs' Chinese prompts, on someone's own text
            rank_zero_warn(
                f"sampler.prompts {self.prompts} have characters that are not in this data's vocabulary and will be "
                f"read as <unk>: {unknown!r}. Set --sampler.prompts to text like your data's (or '[\"\"]')."
            )
        if not self.enabled:
            rank_zero_warn(
                "text samples are off under a sharded strategy (each rank holds only part of the "
                "weights); run `python -m qwen3_lightning generate` on a checkpoint instead."
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.every_n_steps is None and not trainer.sanity_checking:
            self.sample(trainer, pl_module, trainer.log_dir)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.enabled and self._stepped_onto_multiple(trainer, self.every_n_steps):
            self.sample(trainer, pl_module, trainer.log_dir)

    # log_dir is read by the caller on every rank: under DDP, reading it is a collective broadcast
    @rank_zero_only
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        from qwen3_lightning.generation import stream_text

        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        records = []
        for prompt in self.prompts:
            room = pl_module.model.config.max_position_embeddings - len(prompt) - 1  # >= 1, checked in setup
            # eager even when training compiled the layers: decoding shapes would only make them recompile;
            # unknown characters in the prompts were warned about once, in setup
            with torch.compiler.set_stance("force_eager"):
                text = "".join(
                    stream_text(
                        pl_module.model,
                        tokenizer,
                        prompt,
                        min(self.max_new_tokens, room),
                        self.temperature,
                        self.top_k,
                        generator=generator,
                        warn=False,
                    )
                )
            records.append({"step": trainer.global_step, "prompt": prompt, "text": text})
            log.info("sample at step %d: %s", trainer.global_step, prompt + text)
            print(f"[step {trainer.global_step}] {prompt}{text}")
        if log_dir:
            with (Path(log_dir) / "samples.jsonl").open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                body = "\n\n".join(f"**{r['prompt']}**{r['text']}" for r in records)
                experiment.add_text("samples", body, global_step=trainer.global_step)


def is_prediction_file(path: Path) -> bool:
    """Whether ``path`` starts with a record that ``PredictionWriter`` writes."""
    with path.open("rb") as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(record, dict) and {"prompt", "text"} <= record.keys()


class PredictionWriter(BasePredictionWriter):
    """Writes the ``predict`` subcommand's generations as JSON lines, ``{"prompt": ..., "text": ...}``.

    Args:
        output_path: the file to write; default ``predictions.jsonl`` in the run's log folder. Under several
            processes each writes its own file, with the rank before the suffix.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path

    def _path(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_path) if self.output_path else Path(trainer.log_dir or ".") / "predictions.jsonl"
        return path.with_stem(f"{path.stem}.rank{trainer.global_rank}") if trainer.world_size > 1 else path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.PREDICTING:
            return
        # before the checkpoint loads: a path that cannot be written, or a file that is not an earlier
        # prediction file (the prompts, say), stops the run before the file is emptied
        path = self._path(trainer)
        if path.is_dir():
            raise ValueError(f"predict_writer.output_path={path} is a folder; give a file path, e.g. {path}/out.jsonl.")
        from qwen3_lightning.data import find_text_files

        prompts = getattr(trainer.datamodule, "predict_path", None)
        if prompts is not None and path.resolve() in {f.resolve() for f in find_text_files(prompts)}:
            raise ValueError(f"predict_writer.output_path={path} is the prompts file: writing would replace them.")
        if path.is_file() and path.stat().st_size and not is_prediction_file(path):
            raise ValueError(
                f"predict_writer.output_path={path} holds something other than predictions (its first line is "
                'not a {"prompt", "text"} record): choose another path, or delete the file.'
            )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self._path(trainer).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"wrote the generations to {self._path(trainer)}")
