"""Benchmarks of qwen3_lightning: training throughput, MFU and memory; decoding speed; data efficiency.

Each training case runs in a fresh process of this script (the hidden ``--case`` flag), so the peak memory
reported for it is its own; on a CPU, two more processes step ours and transformers' model in turn, and the
Trainer and the plain loop in turn, for speed ratios that a shared machine's slow spells do not tilt. Tables go
to stdout as Markdown, progress to stderr, every number to ``--json``.

    python scripts/benchmark.py                       # small preset, all sections
    python scripts/benchmark.py --quick               # smoke run: tiny preset, a few steps
    python scripts/benchmark.py --sections train --compile --fused
    python scripts/benchmark.py --precision bf16-mixed  # on a CPU with native bf16 (AVX512-BF16, AMX)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qwen3_lightning.callbacks import gpu_bf16_peak, matmul_flops
from qwen3_lightning.config import PRESETS, MatmulPrecision, Qwen3Config
from qwen3_lightning.data import without_needless_mask
from qwen3_lightning.generation import GENERATE_DEFAULTS
from qwen3_lightning.model import Qwen3Transformer, flops_per_token

SECTIONS = ("train", "decode", "data")
PRECISIONS = ("32-true", "bf16-mixed")
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "zh_fortunes.txt"
COMPILE_WARMUP = 3
"""Untimed steps of the torch.compile cases at least: their first two or three steps still compile."""
CASES = {
    "ours": "ours, plain loop",
    "lightning": "ours, Lightning Trainer",
    "hf": "transformers Qwen3ForCausalLM, plain loop",
    "ours_ckpt": "ours, plain loop, gradient checkpointing",
    "hf_fp32": "transformers Qwen3ForCausalLM, plain loop, float32",
    "ours_compiled": "ours, plain loop, torch.compile",
    "lightning_compiled": "ours, Lightning Trainer, torch.compile",
    "lightning_module_compiled": "ours, Lightning Trainer, torch.compile(module)",
}
PAIRED = "paired"
"""The hidden case of ours and transformers stepping in turn in one process (``run_paired``)."""
PAIRED_TRAINER = "paired_trainer"
"""The hidden case of the Trainer and the plain loop stepping in turn in one process (``run_paired_trainer``)."""
PAIRED_MATMUL = "paired_matmul_precision"
"""The hidden case of ours' plain loop stepping under two float32 matmul precisions in turn (``run_paired_matmul``)."""
SAMPLING = {k: GENERATE_DEFAULTS[k] for k in ("temperature", "top_k")}
"""The sampled decoding cases' settings: those ``generate`` and ``predict`` start from (top_p: none)."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="train,decode,data", help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, short sequences, a few steps")
    p.add_argument("--preset", default=None, help="model preset (default: small; tiny with --quick)")
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=6000,
        help="vocabulary of the synthetic batches; 6000 is about a Chinese character vocabulary "
        "(zh_fortunes.txt has 5965 distinct characters, 5969 tokens with the specials)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per example (default 256; --quick: 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per case (default 10; --quick: 2)")
    p.add_argument(
        "--warmup",
        type=positive_int,
        default=None,
        help="untimed steps first, >= 1: the Trainer timer starts at the end of one (default 2; --quick: 1)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="fresh processes per training case, interleaved (default 2; --quick: 1)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="training autocast and decoding weights (default: bf16-mixed on a GPU, 32-true on the CPU); "
        "bf16-mixed on a CPU adds a transformers float32 row, the baseline a CPU user would otherwise run",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile rows (ours: plain loop, Trainer, Trainer with torch.compile(module))",
    )
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated training cases to run, in this order, of {', '.join(CASES)} (default: all that "
        "apply); 'ours' always runs (last, unless listed), as the reference of the other rows",
    )
    p.add_argument("--fused", action="store_true", help="fused AdamW in every case (default: torch's default kernel)")
    p.add_argument(
        "--float32-matmul-precision",
        choices=get_args(MatmulPrecision),
        default="highest",
        help="torch.set_float32_matmul_precision in every case, transformers' too, and for the MFU peak's matmul; "
        "other than highest, ours' plain loop also steps under highest and under this in turn in one process",
    )
    p.add_argument(
        "--new-tokens", type=positive_int, default=None, help="new tokens per decode (default 200; --quick: 16)"
    )
    p.add_argument("--prompt-len", type=positive_int, default=16)
    p.add_argument(
        "--decode-repeats",
        type=positive_int,
        default=None,
        help="timed decodes per case, fastest kept (default 3; --quick: 1)",
    )
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="UTF-8 text for the data section")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--decode-presets", default=None, help="comma-separated presets to decode with (default tiny,small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--case-timeout", type=float, default=1800, help="seconds before a training case's process is stopped"
    )
    p.add_argument("--json", type=Path, default=Path("benchmark.json"), help="where to write all the numbers")
    p.add_argument("--case", choices=[*CASES, PAIRED, PAIRED_TRAINER, PAIRED_MATMUL], help=argparse.SUPPRESS)
    p.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (
        ("preset", "small", "tiny"),
        ("seq_len", 256, 64),
        ("steps", 10, 2),
        ("warmup", 2, 1),
        ("new_tokens", 200, 16),
        ("decode_repeats", 3, 1),
        ("decode_presets", "tiny,small", "tiny"),
        ("repeats", 2, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.cases is not None:
        args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(args.cases) - set(CASES))
        if unknown:
            p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    for name in ("preset", "decode_presets"):
        unknown = sorted(set(getattr(args, name).split(",")) - set(PRESETS))
        if unknown or (name == "preset" and "," in args.preset):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)!r}: choose from {', '.join(PRESETS)}")
    decode_length = args.prompt_len + args.new_tokens
    longest = [(args.preset, args.seq_len, "--seq-len")] if "train" in args.sections else []
    if "decode" in args.sections:
        longest += [(d, decode_length, "--prompt-len + --new-tokens") for d in args.decode_presets.split(",")]
    for preset, length, what in longest:
        limit = Qwen3Config.from_preset(preset).max_position_embeddings
        if length > limit:
            p.error(f"{what} = {length} is longer than {preset}'s max_position_embeddings ({limit})")
    if args.case_timeout <= 0:
        p.error(f"--case-timeout {args.case_timeout} must be a positive number of seconds")
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return args


# --- helpers ---------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for ``bf16-mixed`` (weights and optimizer stay float32, as Lightning does it); none for
    ``32-true``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS); NaN on Windows,
    which has no ``resource`` module."""
    try:
        import resource
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages; None on Windows, which keeps none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_flops(device: torch.device, quick: bool, dtype: torch.dtype) -> tuple[float | None, str]:
    """The FLOP/s that MFU is measured against, and where it comes from: on a CPU, a large matmul in the
    training's compute dtype (bf16 matmuls run at about twice the float32 rate on CPUs with AVX512-BF16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype != torch.bfloat16:
            return None, f"no datasheet {dtype} peak for GPUs here: no MFU"
        peak = gpu_bf16_peak(name)
        return peak, f"datasheet bf16 dense, {name}" if peak else f"unknown GPU {name!r}: no MFU"
    n = 512 if quick else 2048
    source = f"fastest of a {str(dtype).removeprefix('torch.')} {n}x{n} matmul timed before the cases and after "
    return cpu_peak(dtype, quick), source + f"each case's steps, {torch.get_num_threads()} threads"


def cpu_peak(dtype: torch.dtype, quick: bool) -> float:
    """A float32 (or bf16) matmul's FLOP/s on this CPU, as training runs log MFU against (they time n=1024; this
    2048, or 512 with --quick). Timed again in each case's process, after its steps: on a shared machine the
    CPU's speed drifts over minutes (2048x2048 float32 measured 83 GFLOP/s at one benchmark's start and 156-161
    a few minutes later), and the fastest of all the timings is the peak."""
    return matmul_flops(dtype, *((512, 5, 1.0) if quick else (2048, 10, 8.0)))


def memory_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes per second that a sum over a buffer far larger than the caches reads: the ceiling of decoding at
    batch 1, where every new token reads every weight once."""
    x = torch.ones((16 if quick else 64) * 2**20, device=device)  # 64 MiB or 256 MiB of float32
    return x.numel() * x.element_size() / best_time(lambda: x.sum(), device, rounds=5)


def best_time(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Seconds of the fastest of ``rounds`` calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return {True: "yes", False: "NO", None: "n/a"}[v]
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def model_config(args: argparse.Namespace) -> Qwen3Config:
    return Qwen3Config.from_preset(args.preset, vocab_size=args.vocab_size)


def num_parameters(config: Qwen3Config) -> int:
    with torch.device("meta"):
        return Qwen3Transformer(config).num_parameters()


def build_hf(config: Qwen3Config, ours: Qwen3Transformer) -> nn.Module:
    """transformers' Qwen3ForCausalLM with the same shape and the same weights as ``ours``."""
    import transformers

    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.to_hf_config()))
    hf.load_state_dict(ours.state_dict())
    return hf


# --- training: one case per process ---------------------------------------------------------------------


def random_batches(config: Qwen3Config, args: argparse.Namespace, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Fixed random batches without padding, shaped like the DataModule's."""
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.seq_len)
    return [
        {
            "input_ids": torch.randint(4, config.vocab_size, shape, generator=g),
            "labels": torch.randint(4, config.vocab_size, shape, generator=g),
            "attention_mask": torch.ones(shape, dtype=torch.long),
        }
        for _ in range(n)
    ]


def make_optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """AdamW as Qwen3LightningModule configures it: no weight decay on norms, biases and the embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def plain_steps(
    model: nn.Module,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: list[dict[str, torch.Tensor]],
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
) -> Iterator[float]:
    """Seconds of one training step at each ``next()``: forward, cross-entropy, backward, AdamW step, zero_grad."""
    model.to(device).train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    optimizer = make_optimizer(model, args.fused)
    for step in itertools.count():
        batch = batches[step % len(batches)]
        sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        yield time.perf_counter() - start


def plain_model(name: str, config: Qwen3Config, ours: Qwen3Transformer) -> tuple[nn.Module, Callable]:
    """The model of a plain-loop case, and its loss of a batch (cross-entropy of the logits): ``ours`` itself,
    or transformers' model with its weights. Compiled, the model and the loss are one graph, as
    ``Qwen3LightningModule(compile=True)`` compiles them."""
    hf = build_hf(config, ours) if name.startswith("hf") else None
    ours.gradient_checkpointing = name == "ours_ckpt"

    def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        if hf is not None:
            logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        else:  # no mask: the batches have no padding, and TextDataModule drops an all-ones mask
            logits = ours(b["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())

    return (hf if hf is not None else ours), torch.compile(loss_of) if name.endswith("compiled") else loss_of


def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """Ours and transformers' plain loops in this one process, one step each in turn (which goes first
    alternates): a slow spell of a shared machine then slows both alike, and the ratio of each pair of steps
    holds where the ratio of two processes' fastest steps drifts."""
    device, config = pick_device(), model_config(args)
    batches = random_batches(config, args)
    torch.manual_seed(args.seed)
    ours = Qwen3Transformer(config)
    loops = {
        name: plain_steps(*plain_model(name, config, ours), batches, args, device, args.precision)
        for name in ("ours", "hf")  # transformers' model copies ours' weights when it is built, here
    }
    pairs = []
    for i in range(args.warmup + args.steps * args.repeats):
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        times = {name: next(loops[name]) for name in order}
        if i >= args.warmup:
            pairs.append([times["ours"], times["hf"]])
    return {"step_s_pairs": pairs}


class FixedBatches(Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


class StepTimer(L.Callback):
    """Wall time between consecutive ends of training batches: the whole step as the Trainer runs it, with
    batch fetching, device transfer, logging and hooks. With ``between``, that function runs after each
    batch's end (from the second on), outside the timed span: its own return values are kept in ``between_s``."""

    def __init__(self, device: torch.device, between: Callable[[], float] | None = None) -> None:
        self.device, self.between = device, between
        self.step_s: list[float] = []
        self.between_s: list[float] = []
        self._since: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._since is not None:
            self.step_s.append(now - self._since)
            if self.between is not None:
                self.between_s.append(self.between())
                sync(self.device)
                now = time.perf_counter()
        self._since = now


def time_trainer(
    batches: list[dict[str, torch.Tensor]],
    args: argparse.Namespace,
    device: torch.device,
    steps: int,
    compile: str,
    between: Callable[[], float] | None = None,
) -> StepTimer:
    """The timer of ``steps`` Trainer steps, which has the step times from the second on.
    ``compile``: "" (eager), "option" (the module's ``compile=True``) or "module" (``torch.compile(module)``,
    as Lightning's docs show it); ``between``: see ``StepTimer``."""
    from qwen3_lightning.module import Qwen3LightningModule

    module = Qwen3LightningModule(
        preset=args.preset, vocab_size=args.vocab_size, fused=args.fused, compile=compile == "option"
    )
    timer = StepTimer(device, between)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    # the batches as TextDataModule hands them to the module: without their all-ones mask (causal attention then)
    loader = DataLoader(FixedBatches([without_needless_mask(b) for b in batches], steps), batch_size=None)
    trainer.fit(torch.compile(module) if compile == "module" else module, loader)
    return timer


def run_paired_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """The eager Trainer and the eager plain loop in this one process, a step of each in turn: after each
    Trainer step (timed from the end of the plain step before it to its own end, so with everything the
    Trainer does between batches), one plain-loop step of a second model. Each plain step sits between two
    Trainer steps and each Trainer step between two plain ones, so neither kind always goes first."""
    device, config = pick_device(), model_config(args)
    batches = random_batches(config, args)
    torch.manual_seed(args.seed)
    model, loss_of = plain_model("ours", config, Qwen3Transformer(config))
    plain = plain_steps(model, loss_of, batches, args, device, args.precision)
    for _ in range(args.warmup):
        next(plain)
    timed = args.steps * args.repeats
    timer = time_trainer(batches, args, device, args.warmup + timed, compile="", between=lambda: next(plain))
    pairs = list(zip(timer.step_s, timer.between_s, strict=True))[-timed:]
    return {"step_s_pairs": [[lightning, ours] for lightning, ours in pairs]}


def run_paired_matmul(args: argparse.Namespace) -> dict[str, Any]:
    """Ours' eager plain loop in this one process, its steps alternating between the float32 matmul precisions
    highest and ``--float32-matmul-precision`` (which goes first alternates): the speed-up of one setting over
    the other on the same weights, and a slow spell of the machine slows both alike."""
    device, config = pick_device(), model_config(args)
    torch.manual_seed(args.seed)
    model, loss_of = plain_model("ours", config, Qwen3Transformer(config))
    steps = plain_steps(model, loss_of, random_batches(config, args), args, device, args.precision)

    def step(precision: str) -> float:
        torch.set_float32_matmul_precision(precision)
        return next(steps)

    chosen = args.float32_matmul_precision
    for _ in range(args.warmup):
        step("highest")
        step(chosen)
    pairs = []
    for i in range(args.steps * args.repeats):
        order = ("highest", chosen) if i % 2 == 0 else (chosen, "highest")
        times = {precision: step(precision) for precision in order}
        pairs.append([times["highest"], times[chosen]])
    return {"step_s_pairs": pairs}


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training case in this (fresh) process: step times and peak memory."""
    import transformers  # noqa: F401  every case imports the same libraries, so their baseline memory is equal

    device = pick_device()
    config = model_config(args)
    batches = random_batches(config, args)
    baseline = max_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    compiled = name.endswith("compiled")
    warmup = max(args.warmup, COMPILE_WARMUP) if compiled else args.warmup
    if name.startswith("lightning"):
        mode = "module" if name == "lightning_module_compiled" else "option" if compiled else ""
        times = time_trainer(batches, args, device, warmup + args.steps, compile=mode).step_s[-args.steps :]
    else:
        model, loss_of = plain_model(name, config, Qwen3Transformer(config))
        steps = plain_steps(model, loss_of, batches, args, device, case_precision(name, args))
        times = list(itertools.islice(steps, warmup, warmup + args.steps))
    return {
        "step_s": times,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": max_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "peak_flops": cpu_peak(compute_dtype(case_precision(name, args)), args.quick) if device.type == "cpu" else None,
    }


def spawn_case(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            "--threads",
            str(torch.get_num_threads()),
            "--case",
            name,
            "--case-out",
            str(out),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            print(f"case {name} stopped after {timeout} s (--case-timeout):\n{stderr[-3000:]}", file=sys.stderr)
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out.exists():
            print(f"case {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return {"error": proc.stderr[-3000:]}
        return json.loads(out.read_text())


def summarize_runs(runs: list[dict[str, Any]], tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    """One case over its processes: its fastest and median timed step, and the largest memory of any of them.

    Throughput comes from the fastest step: on a shared machine other processes only ever slow a step down."""
    ok = [r for r in runs if "step_s" in r]
    if not ok:
        return {"error": runs[-1].get("error")}
    steps = [t for r in ok for t in r["step_s"]]
    s: dict[str, Any] = {"runs": ok, "median_step_s": statistics.median(steps), "min_step_s": min(steps)}
    s["tokens_per_s"] = tokens / s["min_step_s"]
    s["mfu"] = s["tokens_per_s"] * flops / peak if peak else None
    s["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    s["rss_increase_mb"] = max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in ok)
    s["peak_cuda_mb"] = max(r["peak_cuda_mb"] for r in ok) if ok[0]["peak_cuda_mb"] is not None else None
    return s


def case_precision(name: str, args: argparse.Namespace) -> str:
    return "32-true" if name == "hf_fp32" else args.precision


def train_cases(args: argparse.Namespace, device: torch.device) -> list[str]:
    names = ["ours", "lightning", "hf", "ours_ckpt"]
    if args.precision != "32-true" and device.type == "cpu":
        names.append("hf_fp32")
    if args.compile:
        names += ["ours_compiled", "lightning_compiled", "lightning_module_compiled"]
    if args.cases is None:
        return names
    # in the order given, so that a run cut short by a time limit has the cases that matter most
    return [n for n in args.cases if n in names] + ([] if "ours" in args.cases else ["ours"])


def train_section(
    args: argparse.Namespace, argv: list[str], device: torch.device, peaks: dict[str, float | None]
) -> tuple[dict[str, Any], str, dict[str, float | None]]:
    """The training cases' numbers, their table, and the MFU peak of each precision they ran in: ``peaks``
    (timed before the cases), on a CPU raised to the fastest of the timings that the case processes made."""
    peaks = dict(peaks)
    config = model_config(args)
    n_params = num_parameters(config)
    flops = flops_per_token(config, args.seq_len)
    tokens = args.batch_size * args.seq_len
    names = train_cases(args, device)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(args.repeats):  # round-robin, so a slow spell of the machine hits every case alike
        for name in names:
            print(f"[train] {CASES[name]} (process {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            runs[name].append(spawn_case(name, argv, args.case_timeout))
            if "step_s" in runs[name][-1]:  # in the log at once: a run stopped later keeps this case's numbers
                best = min(runs[name][-1]["step_s"])
                peak = peaks[case_precision(name, args)]
                mfu = f", MFU {100 * tokens * flops / best / peak:.1f}% before the peak's update" if peak else ""
                print(
                    f"[train]   fastest step {1000 * best:,.1f} ms, {tokens / best:,.0f} tokens/s{mfu}", file=sys.stderr
                )
            # the cases so far, in --json until the full report replaces them: a run stopped by a time limit
            # (scripts/gpu_check.sh's) keeps their step times
            partial = {"partial": True, "flops_per_token": flops, "tokens_per_step": tokens, "peaks": peaks}
            part = args.json.with_name(args.json.name + ".part")  # whole or not at all: an earlier file stays intact
            part.write_text(json.dumps({**partial, "train_runs": runs}, indent=2), encoding="utf-8")
            os.replace(part, args.json)
    paired = None
    if "hf" in names and device.type == "cpu":  # a GPU is not shared: its processes' times compare as they are
        print(f"[train] ours and transformers, a step each in turn ({PAIRED}) ...", file=sys.stderr, flush=True)
        paired = spawn_case(PAIRED, argv, args.case_timeout)
        if "step_s_pairs" in paired:
            paired["ours_over_hf"] = statistics.median(hf / ours for ours, hf in paired["step_s_pairs"])
    paired_matmul = None
    if args.float32_matmul_precision != "highest":
        chosen = args.float32_matmul_precision
        print(f"[train] float32 matmul precision highest and {chosen}, a step each in turn ...", file=sys.stderr)
        paired_matmul = spawn_case(PAIRED_MATMUL, argv, args.case_timeout)
        if "step_s_pairs" in paired_matmul:
            paired_matmul["speedup"] = statistics.median(high / other for high, other in paired_matmul["step_s_pairs"])
    paired_trainer = None
    if "lightning" in names and device.type == "cpu":
        print(f"[train] the Trainer and the plain loop, a step each in turn ({PAIRED_TRAINER}) ...", file=sys.stderr)
        paired_trainer = spawn_case(PAIRED_TRAINER, argv, args.case_timeout)
        if "step_s_pairs" in paired_trainer:
            pairs = paired_trainer["step_s_pairs"]
            paired_trainer["lightning_over_ours"] = statistics.median(ours / lightning for lightning, ours in pairs)
    for name, results in runs.items():
        precision = case_precision(name, args)
        samples = [r["peak_flops"] for r in results if r.get("peak_flops")]
        if samples and peaks[precision] is not None:
            peaks[precision] = max(peaks[precision], *samples)
    cases = {
        name: summarize_runs(results, tokens, flops, peaks[case_precision(name, args)])
        for name, results in runs.items()
    }

    def tps(name: str) -> float | None:
        return cases.get(name, {}).get("tokens_per_s")

    memory = "peak_cuda_mb" if device.type == "cuda" else "rss_increase_mb"
    rows = []
    for name, r in cases.items():
        if "error" in r:
            rows.append([CASES[name], "failed", *[None] * 7])
            continue
        rows.append(
            [
                CASES[name],
                r["tokens_per_s"],
                r["min_step_s"] * 1000,
                r["median_step_s"] * 1000,
                100 * r["mfu"] if r["mfu"] is not None else None,
                r["peak_rss_mb"],
                r.get(memory),
                ratio(r["tokens_per_s"], tps("ours")),
                ratio(r.get(memory), cases["ours"].get(memory)),
            ]
        )
    memory_label = "peak CUDA MB" if device.type == "cuda" else "RSS increase MB"
    headers = [
        "case",
        "tokens/s",
        "ms/step (best)",
        "ms/step (median)",
        "MFU %",
        "peak RSS MB (process)",
        memory_label,
        "speed vs ours plain",
        "memory vs ours plain",
    ]
    table = markdown_table(headers, rows)
    result = {"num_parameters": n_params, "flops_per_token": flops, "tokens_per_step": tokens, "cases": cases}
    if paired is not None:
        result["paired"] = paired
    if paired_trainer is not None:
        result["paired_trainer"] = paired_trainer
    if paired_matmul is not None:
        result["paired_matmul_precision"] = paired_matmul
    return result, table, peaks


# --- decoding ----------------------------------------------------------------------------------------------


def timed(
    fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Fastest of ``repeats`` calls of each function, called in turn, in seconds; and each one's last output."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), outputs[name]) for name in fns}


def decode_section(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], str]:
    dtype = compute_dtype(args.precision)
    n = args.new_tokens
    bandwidth = memory_bandwidth(device, args.quick)
    results: dict[str, Any] = {}
    rows, sampled_rows = [], []
    for preset in args.decode_presets.split(","):
        config = Qwen3Config.from_preset(preset, vocab_size=args.vocab_size)
        torch.manual_seed(args.seed)
        ours = Qwen3Transformer(config)
        hf = build_hf(config, ours).to(device, dtype).eval()
        ours = ours.to(device, dtype).eval()
        weight_bytes = ours.num_parameters() * dtype.itemsize
        for batch in (1, 8):
            print(f"[decode] {preset}, batch {batch} ...", file=sys.stderr, flush=True)
            g = torch.Generator().manual_seed(args.seed + batch)
            prompt = torch.randint(4, config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
            mask = torch.ones_like(prompt)

            def run_ours(prompt: torch.Tensor = prompt, model: Qwen3Transformer = ours) -> torch.Tensor:
                return model.generate(prompt, n, temperature=0)

            def run_compiled(prompt: torch.Tensor = prompt, model: Qwen3Transformer = ours) -> torch.Tensor:
                return model.generate(prompt, n, temperature=0, compile=True)

            def run_autotuned(prompt: torch.Tensor = prompt, model: Qwen3Transformer = ours) -> torch.Tensor:
                return model.generate(prompt, n, temperature=0, compile="max-autotune")

            def run_hf(prompt: torch.Tensor = prompt, mask: torch.Tensor = mask, model: nn.Module = hf) -> torch.Tensor:
                return model.generate(
                    prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

            def run_ours_sampled(prompt: torch.Tensor = prompt, model: Qwen3Transformer = ours) -> torch.Tensor:
                return model.generate(prompt, n, **SAMPLING, generator=torch.Generator(device).manual_seed(0))

            def run_autotuned_sampled(prompt: torch.Tensor = prompt, model: Qwen3Transformer = ours) -> torch.Tensor:
                generator = torch.Generator(device).manual_seed(0)
                return model.generate(prompt, n, **SAMPLING, generator=generator, compile="max-autotune")

            def run_hf_sampled(
                prompt: torch.Tensor = prompt, mask: torch.Tensor = mask, model: nn.Module = hf
            ) -> torch.Tensor:
                return model.generate(
                    prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_p=1.0,
                    pad_token_id=0, **SAMPLING,
                )  # fmt: skip

            fns = {
                "ours": run_ours,
                "ours_compiled": run_compiled,
                "ours_max_autotune": run_autotuned,
                "hf": run_hf,
                "ours_sampled": run_ours_sampled,
                "ours_max_autotune_sampled": run_autotuned_sampled,
                "hf_sampled": run_hf_sampled,
            }
            for fn in fns.values():
                fn()  # warm up (and compile)
            timings = timed(fns, device, args.decode_repeats)
            r: dict[str, Any] = {f"{name}_tokens_per_s": batch * n / t for name, (t, _) in timings.items()}
            out_hf = timings["hf"][1]
            r["greedy_outputs_equal"] = all(
                timings[name][1].shape == out_hf.shape and bool(torch.equal(timings[name][1], out_hf))
                for name in ("ours", "ours_compiled", "ours_max_autotune")
            )
            r["ours_over_hf"] = r["ours_tokens_per_s"] / r["hf_tokens_per_s"]
            r["ours_compiled_over_hf"] = r["ours_compiled_tokens_per_s"] / r["hf_tokens_per_s"]
            r["ours_max_autotune_over_hf"] = r["ours_max_autotune_tokens_per_s"] / r["hf_tokens_per_s"]
            for name in ("ours_sampled", "ours_max_autotune_sampled"):
                r[f"{name}_over_hf_sampled"] = r[f"{name}_tokens_per_s"] / r["hf_sampled_tokens_per_s"]
            r["bandwidth_bound_tokens_per_s"] = batch * bandwidth / weight_bytes
            r["ours_max_autotune_share_of_bound"] = (
                r["ours_max_autotune_tokens_per_s"] / r["bandwidth_bound_tokens_per_s"]
            )
            results[f"{preset}_batch_{batch}"] = r
            rows.append(
                [
                    preset,
                    batch,
                    r["ours_tokens_per_s"],
                    r["ours_compiled_tokens_per_s"],
                    r["ours_max_autotune_tokens_per_s"],
                    r["hf_tokens_per_s"],
                    r["ours_over_hf"],
                    r["ours_compiled_over_hf"],
                    r["ours_max_autotune_over_hf"],
                    r["bandwidth_bound_tokens_per_s"],
                    100 * r["ours_max_autotune_share_of_bound"],
                    r["greedy_outputs_equal"],
                ]
            )
            sampled_rows.append(
                [
                    preset,
                    batch,
                    r["ours_sampled_tokens_per_s"],
                    r["ours_max_autotune_sampled_tokens_per_s"],
                    r["hf_sampled_tokens_per_s"],
                    r["ours_sampled_over_hf_sampled"],
                    r["ours_max_autotune_sampled_over_hf_sampled"],
                ]
            )
    headers = [
        "preset",
        "batch",
        "ours tokens/s",
        "ours compiled tokens/s",
        "ours max-autotune tokens/s",
        "transformers tokens/s",
        "ours / transformers",
        "compiled / transformers",
        "max-autotune / transformers",
        "bandwidth bound tokens/s",
        "max-autotune, % of bound",
        "greedy outputs equal",
    ]
    sampled_headers = [
        "preset",
        "batch",
        "ours tokens/s",
        "ours max-autotune tokens/s",
        "transformers tokens/s",
        "ours / transformers",
        "max-autotune / transformers",
    ]
    report = {"memory_bandwidth_gb_s": bandwidth / 1e9, "dtype": str(dtype), "cases": results}
    sampled = ", ".join(f"{k} {v}" for k, v in SAMPLING.items())
    tables = markdown_table(headers, rows) + f"\n\nSampled ({sampled}, the defaults of `generate`):\n\n"
    return report, tables + markdown_table(sampled_headers, sampled_rows)


# --- data ----------------------------------------------------------------------------------------------------


def data_section(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    from qwen3_lightning.data import TextDataModule, read_text
    from qwen3_lightning.tokenizer import CharTokenizer

    if not args.corpus.is_file():
        return None, f"(data section skipped: corpus {args.corpus} not found; pass --corpus)"
    text = read_text(args.corpus)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        tokenizer = CharTokenizer().build_vocab([text])
        tokenizer.encode(text)
        times.append(time.perf_counter() - start)
    chars_per_s = len(text) / min(times)
    modes = {"padded to longest": {}, "bucket_by_length": {"bucket_by_length": True}, "packing": {"packing": True}}
    results: dict[str, Any] = {
        "corpus": str(args.corpus),
        "characters": len(text),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_chars_per_s": chars_per_s,
        "modes": {},
    }
    rows = []
    for mode, kwargs in modes.items():
        print(f"[data] {mode} ...", file=sys.stderr, flush=True)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        dm = TextDataModule(
            train_path=str(args.corpus), val_split=0, max_length=args.seq_len, batch_size=args.batch_size, **kwargs
        )
        setup_s = time.perf_counter() - start
        real = computed = batches = 0
        for batch in dm.train_dataloader():
            real += int(batch["attention_mask"].sum())
            computed += batch["input_ids"].numel()
            batches += 1
        r = {
            "batches": batches,
            "real_tokens": real,
            "computed_tokens": computed,
            "real_fraction": real / computed,
            "datamodule_setup_s": setup_s,
        }
        results["modes"][mode] = r
        rows.append([mode, batches, computed, 100 * r["real_fraction"], setup_s])
    headers = ["batching", "batches/epoch", "computed tokens", "real (non-padding) %", "DataModule setup s"]
    intro = (
        f"Tokenizer (build_vocab + encode of {len(text):,} characters, best of 3): "
        f"{chars_per_s:,.0f} characters/s; vocabulary {tokenizer.vocab_size}."
    )
    return results, intro + "\n\n" + markdown_table(headers, rows)


# --- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.case:
        paired = {PAIRED: run_paired, PAIRED_TRAINER: run_paired_trainer, PAIRED_MATMUL: run_paired_matmul}.get(
            args.case
        )
        result = paired(args) if paired else run_case(args.case, args)
        args.case_out.write_text(json.dumps(result))
        return
    device = pick_device()
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"machine": machine_info(device)}
    report["settings"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("case", "case_out")
    }
    m = report["machine"]
    print(
        f"# qwen3_lightning benchmark\n\n{m['date']}; {m['device']} ({m['device_type']}), {m['threads']} threads; "
        f"torch {m['torch']}, transformers {m['transformers']}, lightning {m['lightning']}; "
        f"load average at start {m['load_average_at_start'][0]:.2f}.\n"
    )
    if args.quick:
        print(
            "**--quick is a smoke run** (tiny shapes, one or two timed steps): it checks that every case runs; "
            "its numbers and ratios are not measurements.\n"
        )
    if device.type == "cpu" and m["load_average_at_start"][0] > (os.cpu_count() or 1):
        print("**Warning:** other processes are using the CPU (see the load average); timings will be noisy.\n")
    ratios: dict[str, float | None] = {}
    if "train" in args.sections:
        precisions = sorted({case_precision(name, args) for name in train_cases(args, device)})
        peaks = {p: peak_flops(device, args.quick, compute_dtype(p)) for p in precisions}
        train, table, best = train_section(args, argv, device, {p: f for p, (f, _) in peaks.items()})
        peaks = {p: (best[p], src) for p, (_, src) in peaks.items()}
        report["peak_flops"] = {p: {"flops": f, "source": src} for p, (f, src) in peaks.items()}
        report["train"] = train
        print(
            f"## Training: preset {args.preset}, batch {args.batch_size} x {args.seq_len} tokens, vocabulary "
            f"{args.vocab_size}, {args.precision}, {'fused' if args.fused else 'default (foreach)'} AdamW\n"
        )
        peak_text = "; ".join(
            f"{p}: {f / 1e9 if f else float('nan'):,.0f} GFLOP/s ({src})" for p, (f, src) in peaks.items()
        )
        print(
            f"{train['num_parameters']:,} parameters; {train['flops_per_token'] / 1e6:.1f} MFLOP per token; "
            f"MFU peak {peak_text}. Each case runs in "
            f"{args.repeats} fresh process(es), {args.warmup} warmup + {args.steps} timed steps each. tokens/s and "
            "MFU come from the fastest step (other processes only slow steps down); memory is the largest of the "
            "processes, and RSS increase is peak RSS minus the RSS after imports."
            + (f" Compiled cases warm up for at least {COMPILE_WARMUP} steps.\n" if args.compile else "\n")
        )
        print(table + "\n")
        cases = train["cases"]

        def tps(name: str) -> float | None:
            return cases.get(name, {}).get("tokens_per_s")

        ratios["train: ours / transformers (tokens/s)"] = ratio(tps("ours"), tps("hf"))
        if "paired" in train:
            ratios["train: ours / transformers, a step each in turn in one process (median of the pairs)"] = train[
                "paired"
            ].get("ours_over_hf")
        if "hf_fp32" in cases:
            ratios[f"train: ours {args.precision} / transformers float32 (tokens/s)"] = ratio(
                tps("ours"), tps("hf_fp32")
            )
        ratios["train: Lightning Trainer / plain loop (tokens/s)"] = ratio(tps("lightning"), tps("ours"))
        if "paired_trainer" in train:
            key = "train: Lightning Trainer / plain loop, a step each in turn in one process (median of the pairs)"
            ratios[key] = train["paired_trainer"].get("lightning_over_ours")
        ratios["train: gradient checkpointing / plain loop (tokens/s)"] = ratio(tps("ours_ckpt"), tps("ours"))
        if "paired_matmul_precision" in train:
            key = (
                f"train: float32 matmul precision {args.float32_matmul_precision} / highest, plain loop, "
                "a step each in turn in one process (median of the pairs)"
            )
            ratios[key] = train["paired_matmul_precision"].get("speedup")
        if args.compile:
            ratios["train: compiled / eager, plain loop (tokens/s)"] = ratio(tps("ours_compiled"), tps("ours"))
            ratios["train: compiled / eager, Trainer (tokens/s)"] = ratio(tps("lightning_compiled"), tps("lightning"))
            ratios["train: torch.compile(module) / eager, Trainer (tokens/s)"] = ratio(
                tps("lightning_module_compiled"), tps("lightning")
            )
    if "decode" in args.sections:
        decode, table = decode_section(args, device)
        report["decode"] = decode
        print(
            f"## Decoding, greedy and sampled: prompt {args.prompt_len} tokens, {args.new_tokens} new "
            f"tokens, weights in {str(compute_dtype(args.precision)).removeprefix('torch.')}, best of "
            f"{args.decode_repeats} (tokens/s counts new tokens of all rows; the prompt's prefill is included in "
            "the time). Bandwidth bound: the tokens/s at which each step would just read every weight once at "
            f"the measured memory bandwidth ({decode['memory_bandwidth_gb_s']:.1f} GB/s, a sum over a buffer "
            "larger than the caches); the share of it reached shows whether a case is limited by memory "
            "traffic or by per-step overhead.\n"
        )
        print(table + "\n")
        for key, r in decode["cases"].items():
            ratios[f"decode {key.replace('_', ' ')}: ours / transformers (tokens/s)"] = r["ours_over_hf"]
            ratios[f"decode {key.replace('_', ' ')}: ours compiled / transformers (tokens/s)"] = r[
                "ours_compiled_over_hf"
            ]
            ratios[f"decode {key.replace('_', ' ')}: ours max-autotune / transformers (tokens/s)"] = r[
                "ours_max_autotune_over_hf"
            ]
            for name, label in (("ours_sampled", "ours"), ("ours_max_autotune_sampled", "ours max-autotune")):
                ratios[f"decode {key.replace('_', ' ')}, sampled: {label} / transformers (tokens/s)"] = r[
                    f"{name}_over_hf_sampled"
                ]
    if "data" in args.sections:
        data, text = data_section(args)
        report["data"] = data
        print(f"## Data: {args.corpus.name}, max_length {args.seq_len}, batch {args.batch_size}\n\n{text}\n")
    if ratios:
        report["ratios"] = ratios
        print("## Ratios\n\n" + markdown_table(["ratio", "value"], [[k, v] for k, v in ratios.items()]) + "\n")
    report["machine"]["load_average_at_end"] = load_average()
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"Numbers written to {args.json}.", file=sys.stderr)


if __name__ == "__main__":
    main()
