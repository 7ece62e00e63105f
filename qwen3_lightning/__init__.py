"""Train small Qwen3-architecture language models on your own text with PyTorch Lightning."""

from qwen3_lightning.config import PRESETS, Qwen3Config
from qwen3_lightning.model import KVCache, Qwen3Transformer
from qwen3_lightning.tokenizer import CharTokenizer, SimpleTokenizer

__all__ = ["PRESETS", "CharTokenizer", "KVCache", "Qwen3Config", "Qwen3Transformer", "SimpleTokenizer",
           "Qwen3LightningModule", "TextDataModule", "TextDataset"]


def __getattr__(name: str):
    # the Lightning parts load on first use, so that the model alone imports quickly
    if name == "Qwen3LightningModule":
        from qwen3_lightning.module import Qwen3LightningModule

        return Qwen3LightningModule
    if name in ("TextDataModule", "TextDataset"):
        from qwen3_lightning import data

        return getattr(data, name)
    raise AttributeError(f"module 'qwen3_lightning' has no attribute {name!r}")
