"""Shared fixtures: small, self-contained Chinese corpora (nothing is downloaded or read from ../shared)."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch

ZH_DOCS = [
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
    "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。",
    "红豆生南国，春来发几枝？\n愿君多采撷，此物最相思！",
    "「你好！」他说。今天天气很好。",
]


POEMS = [
    "春眠不觉晓，处处闻啼鸟。",
    "夜来风雨声，花落知多少。",
    "床前明月光，疑是地上霜。",
    "举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。",
    "欲穷千里目，更上一层楼。",
    "红豆生南国，春来发几枝。",
    "愿君多采撷，此物最相思。",
]
"""Eight one-line quatrains, for the training, distributed and reliability tests."""


def quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer for in-process fits: no checkpoints, bar or summary; no logger unless one is given."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def zh_docs() -> list[str]:
    """A few distinct short Chinese documents (newlines inside, full-width punctuation)."""
    return list(ZH_DOCS)


@pytest.fixture
def zh_corpus_file(tmp_path: Path, zh_docs: list[str]) -> Path:
    """``zh_docs`` written to a UTF-8 .txt file, one document per blank-line-separated paragraph."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(zh_docs) + "\n", encoding="utf-8")
    return path


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker its share of the cores, in this process and in the processes its tests start
    # (the same count in both, so that runs compared bit for bit compute alike)
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
