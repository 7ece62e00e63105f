"""Where a training step on a GPU makes the CPU wait for it: a short fit with the CLI's default callbacks (the
throughput monitor, the learning-rate monitor, the progress bar, a CSV logger every 10 steps) under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronizing operation (a value read back, a
blocking copy), and with ``torch.cuda.synchronize`` counted too. Prints each call site with the steps it waited
at: a site at every step is a stall to remove; one at the logged steps (every 10th) is expected.

    python scripts/gpu_syncs.py --json syncs.json     # on a CUDA GPU; under a minute
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import traceback
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from qwen3_lightning.callbacks import ThrottledProgressBar, TokenThroughput
from qwen3_lightning.data import TextDataModule
from qwen3_lightning.module import Qwen3LightningModule

ROOT = Path(__file__).resolve().parents[1]


class SyncWatch(L.Callback):
    """Turns the sync debug mode on from the training batch of global step ``start`` to that of ``stop`` and
    files the warnings under the step each batch ends at, from its start to the next batch's (the logging
    after a batch's hooks included)."""

    def __init__(self, start: int, stop: int, caught: list[Any]) -> None:
        self.start, self.stop, self.caught = start, stop, caught
        self.sites: dict[str, list[int]] = defaultdict(list)
        self.watched: list[int] = []
        self.step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._file()
        if self.start <= trainer.global_step < self.stop:
            self.step = trainer.global_step + 1
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._file()

    def _file(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        if self.step is not None:
            self.watched.append(self.step)
            for w in self.caught:
                text = str(w.message)
                if "synchronizing" not in text and text != "torch.cuda.synchronize()":
                    continue  # another warning
                site = f"{Path(w.filename).resolve().as_posix().split('site-packages/')[-1]}:{w.lineno}"
                self.sites[site.removeprefix(ROOT.as_posix() + "/")].append(self.step)
        self.step = None
        self.caught.clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40, help="the fit's length; steps 11 to 40 are watched")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the sync debug mode sees nothing on a CPU; nothing to check")
        return
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    texts = ["".join(rng.choices(chars, k=rng.randint(50, 400))) for _ in range(2000)]
    data = TextDataModule(texts=texts, val_split=0.02, max_length=256, batch_size=16, bucket_by_length=True)
    model = Qwen3LightningModule(preset=args.preset, vocab_size=data.vocab_size, warmup_steps=5)
    watch = SyncWatch(10, args.steps, [])
    synchronize = torch.cuda.synchronize

    def counted(*a: Any, **k: Any) -> None:
        if watch.step is not None:
            frame = traceback.extract_stack(limit=2)[0]
            sync = warnings.WarningMessage("torch.cuda.synchronize()", UserWarning, frame.filename, frame.lineno)
            watch.caught.append(sync)
        synchronize(*a, **k)

    torch.cuda.synchronize = counted
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        callbacks = [TokenThroughput(), LearningRateMonitor(logging_interval="step"), ThrottledProgressBar(), watch]
        trainer = L.Trainer(
            max_steps=args.steps,
            precision=args.precision,
            gradient_clip_val=1.0,
            log_every_n_steps=10,
            val_check_interval=1000,
            limit_val_batches=0,
            callbacks=callbacks,
            logger=CSVLogger(tmp, name="logs"),
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        # the debug mode's warnings land in `recorded`; the callback reads them batch by batch
        watch.caught = recorded
        trainer.fit(model, data)
    torch.cuda.synchronize = synchronize
    print(
        f"\n{torch.cuda.get_device_name()}, {args.preset}, {args.precision}: steps {watch.watched[0]} to "
        f"{watch.watched[-1]} watched ({len(watch.watched)}); logged every 10th\n"
    )
    print("| call site | waits | at steps |\n| --- | --- | --- |")
    for site, steps in sorted(watch.sites.items(), key=lambda kv: -len(kv[1])):
        print(f"| {site} | {len(steps)} | {', '.join(map(str, sorted(set(steps))))} |")
    if not watch.sites:
        print("| (none) | 0 | |")
    if args.json:
        args.json.write_text(json.dumps({"watched": watch.watched, "sites": watch.sites}, indent=2))


if __name__ == "__main__":
    main()
