"""fit, validate, test and predict: LightningCLI, with this project's checks and defaults."""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import inspect
import itertools
import locale
import signal
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from qwen3_lightning.callbacks import (
    Checkpoint,
    PredictionWriter,
    ResumeCheckpoint,
    TextSampler,
    ThrottledProgressBar,
    TokenThroughput,
)
from qwen3_lightning.cli import program_name
from qwen3_lightning.config import MatmulPrecision, Qwen3Config
from qwen3_lightning.data import TEXT_SUFFIXES, TextDataModule
from qwen3_lightning.module import Qwen3LightningModule, check_trainer_settings

DEFAULT_ROOT = "runs"
"""The run folder (``trainer.default_root_dir``) when none is given: logs and checkpoints go under it."""


def default_precision() -> str:
    """bf16-mixed on GPUs that compute in bfloat16 natively (Ampere and later); 16-mixed on older CUDA GPUs
    (V100, T4), which torch would run bfloat16 on, emulated and slow; 32-true elsewhere."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def default_loggers(root: str) -> list[Logger]:
    """A CSV logger (``<root>/logs/version_N/metrics.csv``) and, when installed, TensorBoard in the same folder."""
    csv = CSVLogger(root, name="logs")
    loggers: list[Logger] = [csv]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(root, name="logs", version=csv.version, sub_dir="tensorboard"))
    return loggers


class Qwen3CLI(LightningCLI):
    """``python -m qwen3_lightning fit --config configs/tiny.yaml``; every option can be overridden by a flag."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            Qwen3LightningModule,
            TextDataModule,
            trainer_defaults={
                "precision": default_precision(),
                "gradient_clip_val": 1.0,
                "log_every_n_steps": 10,
                "default_root_dir": DEFAULT_ROOT,
                "callbacks": [LearningRateMonitor(logging_interval="step"), TokenThroughput()],
            },
            seed_everything_default=42,
            parser_kwargs={
                "prog": program_name(),
                "description": "Train Qwen3 models on your own text: fit, validate, test, predict. Two more "
                "commands take a checkpoint: `generate` (text) and `export` (a transformers directory); "
                "see `generate --help` and `export --help`.",
            },
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # a misspelt flag is an error, not a silent abbreviation (--model.learning_rat would set learning_rate)
        return super().init_parser(allow_abbrev=False, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            check_config_files(sys.argv[1:] if args is None else list(args))
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # best.ckpt (lowest val_loss) and last.ckpt at each validation
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "checkpoint.enable_version_counter": False,  # overwrite best.ckpt and last.ckpt, never last-v1.ckpt
            }
        )
        # kept copies, every 20 epochs by default
        parser.add_lightning_class_args(Checkpoint, "periodic_checkpoint")
        parser.set_defaults(
            {
                "periodic_checkpoint.save_top_k": -1,
                "periodic_checkpoint.every_n_epochs": 20,
                "periodic_checkpoint.filename": "epoch{epoch}-step{step}",
                "periodic_checkpoint.auto_insert_metric_name": False,
            }
        )
        # last.ckpt between validations (every_n_train_steps) and on SIGTERM / Ctrl-C
        parser.add_lightning_class_args(ResumeCheckpoint, "resume_checkpoint")
        parser.add_lightning_class_args(TextSampler, "sampler")
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        parser.add_argument(
            "--float32_matmul_precision",
            type=MatmulPrecision | None,
            default=None,
            help="torch.set_float32_matmul_precision, set before the Trainer is built: highest computes float32 "
            "matmuls in float32; high lets GPUs use TensorFloat-32 (what Lightning suggests on tensor-core GPUs); "
            "medium also lets CPUs (oneDNN) use bfloat16 inside them. Only float32 matmuls: under bf16-mixed "
            "they are bfloat16 already. Default: torch's own setting, left as it is (highest, unless changed).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_paths(config)
        if config.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(config.float32_matmul_precision)
        root = config.trainer.default_root_dir or DEFAULT_ROOT
        # a fixed folder, not one per logger version, so that `--ckpt_path last` finds the previous run's last.ckpt
        for key in CHECKPOINT_KEYS:
            if config[key].dirpath is None:
                config[key].dirpath = str(Path(root) / "checkpoints")
        check_devices(config.trainer)
        check_trainer_settings(config.trainer.gradient_clip_val, config.trainer.accumulate_grad_batches)
        initial = config.model.initial_checkpoint
        # without a subcommand (run=False) the parser has no --ckpt_path: the caller runs the Trainer itself
        ckpt_path = resolve_ckpt_path(self.subcommand, config.get("ckpt_path"), config.checkpoint, initial, root)
        if self.subcommand:
            config.ckpt_path = ckpt_path
        check_ckpt_path(ckpt_path)
        if initial is not None and ckpt_path is not None:
            config.model.initial_checkpoint = None  # the weights come from ckpt_path: the file is not even read
        elif initial is not None:
            from qwen3_lightning.interop import read_initial_checkpoint

            try:  # a missing file or one that is no checkpoint: said now, before any work
                read_initial_checkpoint(initial, weights=False)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"model.initial_checkpoint: {err}") from None
        if self.subcommand == "fit":
            refuse_to_overwrite(ckpt_path, root, [config[key].dirpath for key in CHECKPOINT_KEYS])
        self._choose_vocabulary(config)

    def _choose_vocabulary(self, config: Any) -> None:
        """Sets ``data.tokenizer_path`` to the vocabulary of the checkpoint whose weights the model takes. With a
        ``--ckpt_path`` file: validate, test and predict take its own, whatever training data the config names;
        so does a resumed fit whose run started from a saved vocabulary (a fine-tuning run, say: its config.yaml
        names a file that may be gone). Its weights need that vocabulary; with another, Lightning's loading
        would be refused. A plain fit builds its own, and a resume checks it against the checkpoint's. Without a
        ``--ckpt_path`` file: the vocabulary of ``model.initial_checkpoint``."""
        given = config.data.tokenizer_path
        ckpt_path = config.get("ckpt_path")
        ckpt = ckpt_path if ckpt_path and Path(ckpt_path).is_file() else None
        vocabulary, recorded = saved_vocabulary(ckpt) if ckpt else (False, None)
        if vocabulary and (self.subcommand != "fit" or recorded):
            config.data.tokenizer_path = str(ckpt)
            if given is not None and given != str(ckpt):
                rank_zero_info(f"data.tokenizer_path: the vocabulary of {ckpt}, which its weights were trained on")
        elif config.model.initial_checkpoint is not None and given is None:  # (left only when not resuming)
            config.data.tokenizer_path = str(config.model.initial_checkpoint)
        default = inspect.signature(TextDataModule).parameters
        unused = [
            f"data.{k}={config.data[k]}" for k in ("vocab_size", "min_freq") if config.data[k] != default[k].default
        ]
        if self.subcommand == "fit" and config.data.tokenizer_path and unused:
            rank_zero_warn(
                f"{' and '.join(unused)} shape a vocabulary built from the training split; with "
                f"data.tokenizer_path={config.data.tokenizer_path} that saved vocabulary is used as it is."
            )

    def _parse_ckpt_path(self) -> None:
        """Where LightningCLI would take all of a checkpoint file's model hyperparameters over the command
        line's, takes only its shape (``model.preset`` and ``model.overrides``, so that validate, test and
        predict need no model flags): the learning rate and every other setting stay this command's.

        A fit takes the shape of ``model.initial_checkpoint``, the model a fine-tuning run starts from (once
        that file is gone, a resumed fine-tuning run takes its own checkpoint's), saying so where it differs
        from the command's; otherwise the command's, which a resume checks against its checkpoint's (named by its
        path or as ``last``), rather than dropping a flag in silence."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        from qwen3_lightning.interop import read_initial_checkpoint

        config = self.config[subcommand]
        initial = config.model.get("initial_checkpoint")
        if subcommand != "fit":  # (`best` and `last` are not yet resolved to files here)
            source = self._resume_file(config) or initial
        else:
            source = initial if initial is None or Path(initial).exists() else self._resume_file(config)
        if not source or not Path(source).exists():
            return
        try:
            hparams = read_initial_checkpoint(source, weights=False)["hyper_parameters"]
            shape = {key: hparams[key] for key in ("preset", "overrides") if key in hparams}
        except Exception:  # not a checkpoint of this package: Lightning's loading, or the check later, says why
            return
        if not shape:
            return
        before = model_shape(config.model)
        self.config = self.parser.parse_object({subcommand: {"model": shape}}, self.config)
        after = model_shape(self.config[subcommand].model)
        if initial is not None and before is not None and after is not None and after != before:
            names = [f.name for f in dataclasses.fields(after) if getattr(after, f.name) != getattr(before, f.name)]
            differ = [f"{n}={getattr(after, n)} (this command's: {getattr(before, n)})" for n in names]
            if source == initial:
                whence = f"model.initial_checkpoint={source}"
            else:
                whence = f"the checkpoint resumed, {source}" if subcommand == "fit" else f"--ckpt_path {source}"
            rank_zero_warn(f"the model's shape comes from {whence}: {', '.join(differ)}")

    @staticmethod
    def _resume_file(config: Any) -> str | None:
        """The checkpoint file ``ckpt_path`` names, ``last`` and ``best`` included, where one exists."""
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            ckpt_path = str(run_checkpoint(ckpt_path, config.checkpoint, config.trainer.get("default_root_dir")))
        return ckpt_path if ckpt_path and Path(ckpt_path).is_file() else None

    def before_fit(self) -> None:
        # the data (read here when data.tokenizer_path defers it), the checkpoint's model shape and vocabulary:
        # checked before anything is written (a log folder, its config.yaml and tokenizer.json); Lightning's FSDP
        # would even load the weights before on_load_checkpoint
        self.datamodule.datasets()
        self.model.check_monitors(self.trainer.callbacks, warn=False)
        self.model.check_criterion()
        self.model.check_data(self.datamodule)
        self.datamodule.check_early_stopping(self.trainer.callbacks)
        for sampler in (c for c in self.trainer.callbacks if isinstance(c, TextSampler)):
            sampler.check_prompts(self.model.config.max_position_embeddings)
        check_val_check_interval(self.trainer, self.datamodule.batches_per_epoch(self.trainer.world_size))
        self._check_checkpoints()
        self.datamodule.check_training_text()  # after: a checkpoint's other vocabulary is the cause to name

    def _check_checkpoints(self) -> None:
        """The shape and vocabulary of fit's ``ckpt_path`` or ``model.initial_checkpoint`` against this run's."""
        from qwen3_lightning.interop import read_initial_checkpoint, tokenizer_state

        resume = self.config.fit.ckpt_path
        initial = self.config.fit.model.initial_checkpoint
        if resume is None and initial is not None:  # its vocabulary and shape, before the log folder is made
            self.model.check_initial_checkpoint(
                read_initial_checkpoint(initial, weights=False), initial, self.datamodule
            )
            return
        if resume is None or not Path(resume).is_file():
            return
        try:
            checkpoint = torch.load(resume, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # not a checkpoint this can read: Lightning's own loading says what is wrong
            return
        self.model.check_resumable(checkpoint, self.datamodule)
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        max_epochs = self.trainer.max_epochs
        if max_epochs not in (None, -1) and epochs.get("completed", 0) > max_epochs:
            raise ValueError(
                f"--ckpt_path {resume} has trained {epochs['completed']} epochs, more than "
                f"trainer.max_epochs={max_epochs}. To train on, resume with --trainer.max_epochs above "
                f"{epochs['completed']}; to evaluate or use that model, give it to validate, test or generate."
            )
        state = tokenizer_state(checkpoint)  # under the name of the DataModule's class, a subclass's too
        if state is not None:
            self.datamodule.check_vocabulary({"tokenizer": state})

    # each command's data, read before the log folder is made, as in before_fit
    def before_validate(self) -> None:
        _ = self.datamodule.val_dataset

    def before_test(self) -> None:
        _ = self.datamodule.test_dataset

    def before_predict(self) -> None:
        _ = self.datamodule.prompts
        self.model.check_prompts(self.datamodule)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # this CLI's own callbacks step aside for a run without checkpoints or without a logger, which Lightning
        # would refuse: a ModelCheckpoint without enable_checkpointing, a LearningRateMonitor without a logger
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, ResumeCheckpoint))]
        # the default bar, redrawn twice a second, not after every batch; a bar of the user's own, or none, as asked
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, ThrottledProgressBar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        if not trainer.loggers:
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        return trainer

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or DEFAULT_ROOT)
        return super().instantiate_trainer(**kwargs)


def check_val_check_interval(trainer: Trainer, batches: int) -> None:
    """Refuses a ``trainer.val_check_interval`` of more batches than an epoch has (``batches`` on each process),
    which Lightning refuses only once the log folder is made, with a traceback."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if isinstance(interval, int) and trainer.check_val_every_n_epoch is not None and interval > batches:
        raise ValueError(
            f"trainer.val_check_interval={interval} is more than the {batches} training batches of an epoch (on "
            f"each of {trainer.world_size} process(es)), so validation would never come round. Give at most "
            f"{batches}, a fraction of an epoch (0.5: twice an epoch), or --trainer.check_val_every_n_epoch null "
            "to count batches across epochs."
        )


def check_devices(trainer: Any) -> None:
    """Refuses settings that need a CUDA GPU where this PyTorch sees none, before any work."""
    if torch.cuda.is_available():
        return
    strategy = trainer.strategy
    if "fsdp" in str(getattr(strategy, "class_path", strategy)).lower():
        raise ValueError(
            "trainer.strategy is FSDP, which Lightning runs on CUDA GPUs only, and this PyTorch sees none. On a "
            "CPU, leave out configs/fsdp.yaml (several processes: --trainer.strategy ddp --trainer.devices 2)."
        )
    if str(trainer.accelerator).lower() in ("gpu", "cuda"):
        raise ValueError(
            f"trainer.accelerator={trainer.accelerator}, but this PyTorch sees no CUDA GPU; use "
            "--trainer.accelerator cpu (or auto)."
        )


def check_config_files(args: list[str]) -> None:
    """Refuses a ``--config`` file that is no YAML mapping of settings, naming it (jsonargparse names neither the
    file nor the fix, and prints a text file given by mistake whole), and settings beyond ASCII that this Python
    would read and write in another encoding than UTF-8 (``check_file_encoding``)."""
    import yaml

    given = [v for flag, v in itertools.pairwise(args) if flag in ("-c", "--config")]
    given += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in map(Path, given):
        if not path.is_file():
            continue  # a missing file: jsonargparse names it
        # a text file given as the config: say where it goes
        hint = f" To train on it, give it as --data.train_path {path}." if path.suffix.lower() in TEXT_SUFFIXES else ""
        try:
            content = path.read_text(encoding="utf-8-sig")
            settings = yaml.safe_load(content)
        except UnicodeDecodeError:
            raise ValueError(f"--config {path} is not UTF-8 text, so no YAML config.{hint}") from None
        except yaml.YAMLError as err:
            parts = [
                f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text
                for text, mark in ((getattr(err, "context", None), getattr(err, "context_mark", None)),
                                   (getattr(err, "problem", None), getattr(err, "problem_mark", None)))
                if text
            ]  # fmt: skip
            if "escape" in str(getattr(err, "problem", "")):  # "C:\Users\me": \U starts an escape in double quotes
                hint += f" {QUOTED_BACKSLASHES}"
            raise ValueError(f"--config {path} is not valid YAML: {', '.join(parts) or err}.{hint}") from None
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(
                f"--config {path} holds a YAML {type(settings).__name__}, not settings ('section: ...' lines, as "
                f"in configs/tiny.yaml).{hint}"
            )
        check_file_encoding(f"--config {path}", content)
    for arg in args:
        check_file_encoding(f"the argument {arg}", arg)


QUOTED_BACKSLASHES = (
    "In double quotes, YAML reads a backslash as the start of an escape (\\n is a newline, \\t a tab): write "
    "Windows paths in single quotes ('C:\\new\\poems.txt'), unquoted, or with forward slashes (C:/new/poems.txt)."
)


def check_paths(config: Any) -> None:
    """Refuses a path setting that holds a control character, as a Windows path in a YAML file's double quotes
    does (``"C:\\new\\train.txt"`` is ``C:``, a newline, ``ew``, a tab, ``rain.txt``): no file is named so,
    and the error would otherwise be a file "not found" whose name prints like the one written."""
    for key, value in config.items():
        if not key.endswith(("path", "dir", "filename", "checkpoint")):
            continue
        for text in map(str, value if isinstance(value, (list, tuple)) else [value] if value is not None else []):
            control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
            if control is not None:
                name = CONTROL_NAMES.get(control, f"the control character U+{ord(control):04X}")
                raise ValueError(f"--{key} {text!r} holds {name}. {QUOTED_BACKSLASHES}")


CONTROL_NAMES = {"\n": "a newline (\\n)", "\t": "a tab (\\t)", "\r": "a carriage return (\\r)"}


def check_file_encoding(what: str, text: str) -> None:
    """Refuses settings beyond ASCII (``text``, from ``what``) where Python reads and writes text files in an
    encoding other than UTF-8, as on Windows outside UTF-8 mode (cp1252, or GBK on Chinese Windows): jsonargparse
    reads the ``--config`` files and writes the run's config.yaml in it, so their Chinese text would be misread,
    or crash the run once its log folder is made, or leave a config.yaml that other machines cannot read."""
    encoding = locale.getpreferredencoding(False)  # what open() uses when given no encoding
    if text.isascii() or codecs.lookup(encoding).name == "utf-8":
        return
    raise ValueError(
        f"{what} holds characters beyond ASCII, but this Python reads and writes text files in {encoding}, not "
        "UTF-8: jsonargparse would misread them in a config file, or fail to write the run's config.yaml once the "
        "run has started. Run Python in UTF-8 mode: set PYTHONUTF8=1 first (Windows cmd: `set PYTHONUTF8=1`, "
        "PowerShell: `$env:PYTHONUTF8=1`), or start it as `python -X utf8 -m qwen3_lightning ...`."
    )


def model_shape(model: Any) -> Qwen3Config | None:
    """The shape that ``model.preset`` and ``model.overrides`` give (the vocabulary's size aside); None when
    they give none, which the module's construction then reports."""
    try:
        return Qwen3Config.for_vocabulary(model.get("preset"), model.get("overrides"), vocab_size=1)
    except (ValueError, TypeError):
        return None


def saved_vocabulary(path: str) -> tuple[bool, str | None]:
    """Whether ``path`` is a training checkpoint of this package, with the vocabulary inside, and the
    ``data.tokenizer_path`` its run was given (None: it built its vocabulary from its training split)."""
    from qwen3_lightning.interop import read_checkpoint, tokenizer_state

    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except (FileNotFoundError, ValueError):
        return False, None
    recorded = (checkpoint.get("datamodule_hyper_parameters") or {}).get("tokenizer_path")
    return tokenizer_state(checkpoint) is not None, recorded


def run_checkpoint(which: str, checkpoint: Any, root: str | None) -> Path:
    """The run's ``best`` or ``last`` checkpoint file (``which``), where the CLI's ``checkpoint`` callback
    writes it: its ``dirpath``, by default ``checkpoints/`` in the run's folder."""
    folder = checkpoint.dirpath or Path(root or DEFAULT_ROOT, "checkpoints")
    return Path(folder) / f"{checkpoint.filename if which == 'best' else 'last'}.ckpt"


def resolve_ckpt_path(
    subcommand: str | None,
    ckpt_path: str | None,
    checkpoint: Any,
    initial_checkpoint: str | None = None,
    root: str | None = None,
) -> str | None:
    """``--ckpt_path best`` and ``last`` as the files of this run's folder, which Lightning, in a new process,
    would not find for ``best``. ``fit --ckpt_path last`` with no last.ckpt yet starts a new run (so that one
    command both starts and resumes a job), saying where it looked, unless the folder holds other checkpoints
    (a SLURM requeue's ``hpc_ckpt_*.ckpt`` in ``root`` aside, which Lightning resumes itself); otherwise a
    missing file is an error."""
    if ckpt_path is None and initial_checkpoint is None and subcommand in ("validate", "test", "predict"):
        rank_zero_warn(f"{subcommand} without --ckpt_path uses a new, untrained model; give a checkpoint to use.")
    if ckpt_path not in ("best", "last"):
        return ckpt_path
    file = run_checkpoint(ckpt_path, checkpoint, root)
    if file.is_file():
        return str(file)
    requeued = root is not None and any(Path(root).glob("hpc_ckpt_*.ckpt"))
    others = checkpoints_in(file.parent)
    if subcommand == "fit" and ckpt_path == "last" and others and not requeued:
        raise FileNotFoundError(
            f"--ckpt_path last: there is no {file}, but its folder holds an earlier run's "
            f"{', '.join(p.name for p in others[:4])}. Resume from one of them by its path (the newest: --ckpt_path "
            f"{others[0]}), start a new run elsewhere with --trainer.default_root_dir, or delete the folder to "
            "start over."
        )
    if subcommand == "fit" and ckpt_path == "last":
        rank_zero_warn(f"--ckpt_path last: there is no {file} yet, so this run starts from step 0.")
        return None
    raise FileNotFoundError(
        f"--ckpt_path {ckpt_path}: there is no {file}. best.ckpt is written at a run's first validation, last.ckpt "
        "at each validation and when a run ends; check --trainer.default_root_dir (or --checkpoint.dirpath), or give "
        "a checkpoint file."
    )


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``--ckpt_path`` that does not exist, is a folder (a run's checkpoints, an export) or is not a checkpoint
    of this package: said now, as ``generate`` and ``export`` say it, not by a traceback from Lightning's loading
    once the run has started. Remote paths, ``hpc``, and folders of sharded checkpoints are left to Lightning."""
    from qwen3_lightning.interop import is_export, read_checkpoint

    if ckpt_path is None or ckpt_path == "hpc" or "://" in ckpt_path:
        return
    path = Path(ckpt_path)
    if path.is_dir() and not is_export(path) and not any(path.glob("*.ckpt")):
        return  # a sharded checkpoint (FSDP's state_dict_type: sharded) is a folder
    read_checkpoint(path, mmap=True)


CHECKPOINT_KEYS = ("checkpoint", "periodic_checkpoint", "resume_checkpoint")
"""The CLI's checkpoint callbacks, each with its own folder."""


def refuse_to_overwrite(ckpt_path: str | None, root: str, dirpaths: list[str]) -> None:
    """Stops a ``fit`` that would write over the checkpoints of an earlier run: best.ckpt and last.ckpt have
    fixed names. Resuming a checkpoint of these folders (a file in them: ``last`` and ``best`` are resolved to
    theirs by now) continues that run, and a SLURM requeue (``hpc``, or an ``hpc_ckpt_*.ckpt`` in ``root``)
    resumes from ``hpc_ckpt_*.ckpt``: both go ahead."""
    folders = {Path(d).resolve() for d in dirpaths}
    resumes = ckpt_path == "hpc" or (ckpt_path is not None and Path(ckpt_path).resolve().parent in folders)
    if resumes or any(Path(root).glob("hpc_ckpt_*.ckpt")):
        return
    earlier = checkpoints_in(*folders)
    if earlier:
        where = ", ".join(sorted({str(Path(d)) for d in dirpaths}))
        names = ", ".join(sorted({p.name for p in earlier})[:4])
        last = next((p for p in earlier if p.name == "last.ckpt"), None)
        resume = "--ckpt_path last" if last else f"--ckpt_path {earlier[0]} (the newest)"
        raise ValueError(
            f"{where} holds the checkpoints of an earlier run ({names}), which this run would overwrite. Continue "
            f"that run with {resume}, start this one elsewhere with --trainer.default_root_dir, or delete the "
            "folder to start over."
        )


def checkpoints_in(*folders: Path) -> list[Path]:
    """The .ckpt files of ``folders``, newest first."""
    found = {p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")}
    return sorted(found, key=lambda p: -p.stat().st_mtime)


def run(args: list[str] | None = None) -> None:
    """``Qwen3CLI`` as ``main`` runs it: Lightning's warnings that do not apply here silenced, and its
    exceptions of a stop and of a refused setting turned into an exit status and a one-line error."""
    # TextDataModule restores the position inside an epoch itself (EpochSampler), which Lightning cannot see
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # at the end of a run that stopped before any validation: best.ckpt simply waits for one (val_loss is logged
    # at every validation); a monitor set to a key that is never logged still gets the warning
    warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val_loss'\)` could not find")
    # the checkpoint folder is the run's, fixed: a resume finds it full, and a new run over it is refused
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning (2.6) flattens its loaders' and loops' state with torch's LeafSpec, which newer torch (2.13 here)
    # deprecates: a FutureWarning once in every command that runs a loop, Lightning's to fix, not the user's
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
    try:
        Qwen3CLI(args=args)
    except SIGTERMException:  # last.ckpt is saved; Lightning would exit with 0, as if the run had finished
        sys.exit(128 + signal.SIGTERM)  # 143, what a process stopped by SIGTERM reports
    except MisconfigurationException as err:  # Lightning's refusal of a setting: its message names the setting
        sys.exit(f"error: {err}")
