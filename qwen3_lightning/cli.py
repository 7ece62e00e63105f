"""The command line: its entry point (`main`), and `generate` and `export`, which need no Trainer; fit, validate,
test and predict are in `lightning_cli`."""

from __future__ import annotations

import codecs
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentParser

from qwen3_lightning.generation import GENERATE_DEFAULTS


class FullOptionsParser(ArgumentParser):
    """jsonargparse's parser, taking options only as spelt in full (argparse would take ``--ckpt`` for
    ``--ckpt_path``), in the subcommands' parsers too: jsonargparse's ``CLI`` builds those of its own class
    without the settings it was given (before 4.53)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def generate(
    ckpt_path: str,
    prompt: str = "",
    max_new_tokens: int = GENERATE_DEFAULTS["max_new_tokens"],
    temperature: float = GENERATE_DEFAULTS["temperature"],
    top_k: int | None = GENERATE_DEFAULTS["top_k"],
    top_p: float | None = GENERATE_DEFAULTS["top_p"],
    num_samples: int = 1,
    seed: int | None = None,
    device: str = "auto",
    compile: bool | Literal["max-autotune"] = False,
) -> list[str]:
    """Writes text from a training checkpoint, printing it as it is produced.

    Args:
        ckpt_path: a .ckpt file of a training run (its vocabulary is inside).
        prompt: the text to continue; empty starts from <bos>.
        max_new_tokens: tokens to generate per sample.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only.
        top_p: sample within the smallest set of tokens holding this much probability.
        num_samples: how many continuations to write.
        seed: seed for reproducible sampling.
        device: cpu, cuda, cuda:N, mps, or auto (cuda when available).
        compile: compile the decoding step with torch.compile (true): a slow first sample, faster tokens after;
            max-autotune: weights frozen into the graph and GEMM kernels picked by timing, a first call of tens
            of seconds and, on a CPU, two to three times faster tokens again.
    """
    from qwen3_lightning.generation import check_decoding_args, stream_text, unknown_characters
    from qwen3_lightning.interop import model_and_tokenizer, read_checkpoint

    check_decoding_args(temperature, top_k, top_p, max_new_tokens, compile)
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    device = resolve_device(device)
    checkpoint = read_checkpoint(ckpt_path, mmap=True)  # the weights are copied into the model, once
    model, tokenizer = model_and_tokenizer(checkpoint, ckpt_path)
    model.to(device).eval()
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    message = unknown_characters(tokenizer, prompt)
    if message:  # once, on its own line, before the text (the library's warning would land inside it)
        print(f"warning: {message}", file=sys.stderr)
    trained = checkpoint.get("datamodule_hyper_parameters", {}).get("max_length")
    last_input = len(tokenizer.encode(prompt)) + max_new_tokens - 1  # <bos> is at 0; the last new token is not fed
    fits = last_input + 2 <= model.config.max_position_embeddings  # (else generation refuses, saying so)
    if trained and last_input >= trained and fits:
        print(
            f"warning: the model was trained on {trained} positions (data.max_length); the prompt and "
            f"max_new_tokens={max_new_tokens} reach position {last_input}, and text past position {trained - 1} "
            "is usually worse. For longer text, train with a larger data.max_length.",
            file=sys.stderr,
        )
    texts = []
    for i in range(num_samples):
        pieces = stream_text(
            model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, generator, compile, warn=False
        )
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(prompt)
        text = []
        for piece in pieces:
            text.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        texts.append("".join(text))
        sys.stdout.write("\n")
    return texts


def resolve_device(device: str) -> str:
    """``generate --device``: cpu, cuda, cuda:N or mps where this PyTorch has it; auto is cuda when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not a device: use cpu, cuda, cuda:N (the N-th GPU), mps or auto.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this PyTorch sees no CUDA GPU; use --device cpu (or auto).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}, but this PyTorch has no Apple GPU (MPS) here; use --device cpu.")
    return device


def export(ckpt_path: str, out_dir: str, dtype: str | None = None, overwrite: bool = False) -> None:
    """Writes a training checkpoint as a transformers model directory.

    The directory holds config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json and vocab.json.

    Args:
        ckpt_path: a .ckpt file of a training run.
        out_dir: the directory to write.
        dtype: float32, bfloat16 or float16; default (or auto): the checkpoint's.
        overwrite: write into a directory that already holds files, replacing an earlier export there.
    """
    from qwen3_lightning.interop import as_dtype, check_out_dir, export_pretrained, load_checkpoint

    dtype = as_dtype(dtype)  # before the checkpoint is read
    check_out_dir(Path(out_dir))
    held = sorted(p.name for p in Path(out_dir).glob("*")) if Path(out_dir).is_dir() else []
    if held and not overwrite:
        raise ValueError(
            f"out_dir {out_dir} already holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
            "choose a new directory, or pass --overwrite true to write over them."
        )
    model, tokenizer = load_checkpoint(ckpt_path)
    out = export_pretrained(model, out_dir, tokenizer, dtype)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def program_name() -> str | None:
    """How help and usage name the program: ``python -m qwen3_lightning`` rather than ``__main__.py``."""
    return "python -m qwen3_lightning" if Path(sys.argv[0]).name == "__main__.py" else None


def raised_here(err: BaseException) -> bool:
    """Whether this package raised ``err`` itself: a checked input refused on purpose, whose message says
    everything. Errors from anywhere else keep their traceback, which is what one needs to debug them."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


class Unprintable:
    """The encoding error handler of standard output where its encoding lacks characters (Windows writes output
    redirected to a file or pipe in its code page: cp1252 has no Chinese, GBK no '\ufffd', the sign of <unk>):
    each prints as '?', and the first is said once on stderr, rather than a UnicodeEncodeError ending a run at
    its first text sample."""

    name = "qwen3_lightning.unprintable"

    def __init__(self) -> None:
        self.encoding, self.said = "", False

    def __call__(self, err: UnicodeError) -> tuple[str, int]:
        if not isinstance(err, UnicodeEncodeError):
            raise err
        if not self.said:
            self.said = True
            print(
                f"\nwarning: standard output is written in {self.encoding or err.encoding}, which lacks some "
                "characters of this text: they print as '?' (a run's samples.jsonl and predictions.jsonl hold them "
                "all). To print them, set PYTHONUTF8=1 (Windows cmd: `set PYTHONUTF8=1`, PowerShell: "
                "`$env:PYTHONUTF8=1`).",
                file=sys.stderr,
            )
        return "?" * (err.end - err.start), err.end


UNPRINTABLE = Unprintable()
codecs.register_error(Unprintable.name, UNPRINTABLE)


def print_what_stdout_can() -> None:
    """Standard output without crashing on characters its encoding lacks (``Unprintable``); UTF-8 is left as is."""
    stream, encoding = sys.stdout, getattr(sys.stdout, "encoding", None)
    if encoding and hasattr(stream, "reconfigure") and not codecs.lookup(encoding).name.startswith("utf"):
        UNPRINTABLE.encoding = encoding
        stream.reconfigure(errors=Unprintable.name)


def __getattr__(name: str) -> Any:
    # Qwen3CLI lived here before generate and export shed Lightning: `from qwen3_lightning.cli import Qwen3CLI`
    # still works, importing Lightning only then
    if name == "Qwen3CLI":
        from qwen3_lightning.lightning_cli import Qwen3CLI

        return Qwen3CLI
    raise AttributeError(f"module 'qwen3_lightning.cli' has no attribute {name!r}")


def main(args: list[str] | None = None) -> None:
    """The entry point. ``generate`` and ``export`` need no Trainer: they start without importing Lightning,
    about half of their start-up time."""
    print_what_stdout_can()
    first = (sys.argv[1:] if args is None else args)[:1]
    try:
        if first in (["generate"], ["export"]):
            from jsonargparse import CLI

            CLI(
                {"generate": generate, "export": export},
                args=args,
                as_positional=False,
                prog=program_name(),
                parser_class=FullOptionsParser,
            )
        else:
            from qwen3_lightning.lightning_cli import run

            run(args)
    except KeyboardInterrupt:  # Ctrl-C in generate or export (fit handles its own): no traceback from inside torch
        print(file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if not raised_here(err):
            raise
        sys.exit(f"error: {err}")
