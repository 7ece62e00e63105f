"""Train small Qwen3-architecture language models on your own text with PyTorch Lightning."""

from importlib import import_module
from typing import Any

# Names load on first use: `qwen3_lightning.config` stays free of torch, and the model imports without Lightning.
_EXPORTS = {
    "PRESETS": "config",
    "Qwen3Config": "config",
    "CharTokenizer": "tokenizer",
    "SimpleTokenizer": "tokenizer",
    "KVCache": "model",
    "Qwen3Transformer": "model",
    "TextDataModule": "data",
    "TextDataset": "data",
    "Qwen3LightningModule": "module",
    "TextSampler": "callbacks",
    "Qwen3CLI": "lightning_cli",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen3_lightning' has no attribute {name!r}")
    return getattr(import_module(f"qwen3_lightning.{_EXPORTS[name]}"), name)
