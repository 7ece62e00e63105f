"""Reading raw text, and the LightningDataModule that owns the tokenizer and the padded batching."""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qwen3_lightning.config import as_int
from qwen3_lightning.tokenizer import SPECIAL_TOKENS, CharTokenizer

log = logging.getLogger(__name__)

SAMPLE_CORPUS = Path(__file__).parent / "corpora" / "tang300.txt"
"""The bundled sample: the 300 Tang poems (public domain), one poem per paragraph."""
TEXT_SUFFIXES = (".txt", ".jsonl")
IGNORE_INDEX = -100
"""Label of positions that the loss skips (padding); the default ``ignore_index`` of ``nn.CrossEntropyLoss``."""
VOCABULARY_ADVICE = (
    "The vocabulary is built from the training split, so other data, another data.val_split or a data.val_path "
    "changes it. Use the data and split the run started with, or pass --data.tokenizer_path with the checkpoint "
    "(or its run's tokenizer.json, next to metrics.csv) to encode this data with the checkpoint's vocabulary."
)
"""The end of every refusal of a checkpoint whose vocabulary is not the one this run's data gives."""


def vocabulary_mismatch(saved: str, tokenizer_path: str | None, ours: str) -> str:
    """The refusal of a checkpoint whose vocabulary (``saved``, described) is not this run's (``ours``), which
    is built from the training split or, with ``tokenizer_path``, read from that file."""
    if tokenizer_path is None:
        return f"{saved}, but this run's data gives {ours}: resuming would renumber characters. {VOCABULARY_ADVICE}"
    return (
        f"{saved}, but data.tokenizer_path={tokenizer_path} has {ours}: resuming would renumber characters. Resume "
        "with the vocabulary the run started with: pass the checkpoint itself as --data.tokenizer_path (or its "
        "run's tokenizer.json, next to metrics.csv), or leave data.tokenizer_path out to build it again from the "
        "run's own data."
    )


def find_text_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files named by ``paths``, and the .txt and .jsonl files of the directories among them, searched
    recursively, in sorted order, past hidden files and folders (``.git``, ``.ipynb_checkpoints``: copies that
    would repeat the text). A file named itself is taken whatever its suffix (read as .txt unless .jsonl)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise FileNotFoundError(
                    f"directory {p} holds no {' or '.join(TEXT_SUFFIXES)} files (hidden ones are not searched)."
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"data path {p} does not exist (working directory: {Path.cwd()}). "
                "Pass an existing .txt/.jsonl file or a directory of them."
            )
    first: dict[Path, Path] = {}
    for f in files:
        first.setdefault(f.resolve(), f)  # each file as first named
    if len(first) < len(files):  # a file listed twice, or a file and its folder: its text would count double
        counts = Counter(f.resolve() for f in files)
        twice = sorted(str(first[f]) for f, n in counts.items() if n > 1)
        rank_zero_warn(f"data paths name {', '.join(twice[:3])} more than once; each file is read once.")
    return list(first.values())


COMPRESSED = {rb"\x1f\x8b": ("a gzip", "gunzip -k"), rb"PK\x03\x04": ("a zip", "unzip"),
              rb"\xfd7zXZ\x00": ("an xz", "unxz -k"), rb"BZh[1-9]1AY&SY": ("a bzip2", "bunzip2 -k"),
              rb"\x28\xb5\x2f\xfd": ("a zstd", "unzstd")}  # fmt: skip
"""The first bytes of compressed files (as regular expressions), their format, and the command that unpacks one."""


def read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        packed = next((how for magic, how in COMPRESSED.items() if re.match(magic, raw[:16])), None)
        if packed:
            raise ValueError(
                f"{file} is {packed[0]}-compressed file, not text: unpack it first (`{packed[1]} {file.name}`) "
                "and give the unpacked file."
            ) from None
        start = err.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        # a UTF-16 byte-order mark is what Windows Notepad writes when saving as "Unicode"; without one, most
        # often GBK. UTF-32's marks come first: the little-endian one starts with UTF-16's.
        boms = {
            codecs.BOM_UTF32_LE: "UTF-32",
            codecs.BOM_UTF32_BE: "UTF-32",
            codecs.BOM_UTF16_LE: "UTF-16",
            codecs.BOM_UTF16_BE: "UTF-16",
        }
        source = next((encoding for bom, encoding in boms.items() if raw.startswith(bom)), None)
        if source is None and (order := utf16_newline(raw)):  # UTF-16 without a mark, told by its newlines
            source = f"UTF-16{order}"
        if source is None and start < 4 and 0x80 <= raw[start] < 0xC0:  # a UTF-8 continuation byte first
            rest = raw[start:].lstrip(bytes(range(0x80, 0xC0)))
            try:
                text = rest.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            # the rest is UTF-8 text, with characters beyond ASCII (not a binary file that happens to decode)
            if "\x00" not in text and any(ord(c) > 127 for c in text[:100_000]):
                raise ValueError(
                    f"{file} starts in the middle of a UTF-8 character (byte {start} is {raw[start : start + 1]!r}), "
                    f"as a file cut out of a larger one does: drop its first {len(raw) - start - len(rest)} byte(s), "
                    "or cut it at a line start (e.g. with split -l or head -n)."
                ) from None
        # cut at the end: all before it decodes, and the last bytes begin a UTF-8 character that never ends
        if source is None and err.reason == "unexpected end of data":
            raise ValueError(
                f"{file} ends in the middle of a UTF-8 character (its last {len(raw) - start} byte(s)), as a file cut "
                "out of a larger one by size does: drop them, or cut it at a line end (e.g. with head -n)."
            ) from None
        how = (
            f"`iconv -f {source} -t UTF-8 in.txt > out.txt`"
            if source
            else "`iconv -f GB18030 -t UTF-8 in.txt > out.txt` for Chinese text (GBK), or -f CP1252 for Western "
            "European text (Windows' Latin-1)"
        )
        # no iconv there; Notepad reads the code page's text (GBK on Chinese Windows) and marked UTF-16
        notepad = (
            " On Windows, Notepad converts it: File > Save As, Encoding: UTF-8." if sys.platform == "win32" else ""
        )
        raise ValueError(
            f"{file} is not UTF-8 text: byte {start} is {raw[start : start + 1]!r}. Convert it, e.g. {how}.{notepad}"
        ) from None
    # UTF-16 without a byte-order mark decodes as UTF-8 where it is ASCII, every other byte NUL (a stray NUL in
    # real text is left alone: it is one more character)
    head = raw[:4096]
    if head.count(0) > len(head) // 10:
        raise ValueError(
            f"{file} is {head.count(0) / len(head):.0%} NUL bytes, which no text is: it is most likely UTF-16 "
            f"without a byte-order mark. Convert it, e.g. `iconv -f UTF-16{utf16_order(raw)} -t UTF-8 in.txt > "
            "out.txt`; a binary file cannot be trained on."
        )
    return text


def whole_number(name: str, value: object) -> int:
    """``value`` as an ``int`` (``config.as_int``), refused by ``name`` where it is no whole number."""
    number = as_int(value)
    if number is None:
        raise ValueError(f"{name}={value!r} must be a whole number.")
    return number


def utf16_order(raw: bytes) -> str:
    """The byte order of UTF-16 text without a byte-order mark, from where most of its NUL bytes are: the high
    bytes of ASCII characters (newlines at least), which come first (even offsets) in big-endian order."""
    head = raw[:4096]
    return "BE" if head[0::2].count(0) > head[1::2].count(0) else "LE"


def utf16_newline(raw: bytes) -> str | None:
    """ "LE" or "BE" where the first 4 KB hold a UTF-16 newline in that byte order (``0a 00`` or ``00 0a``, at an
    even offset), else None. Chinese UTF-16 has few NUL bytes but these; a stray NUL in other text is no sign."""
    pairs = {raw[i : i + 2] for i in range(0, min(len(raw), 4096) - 1, 2)}
    return "LE" if b"\n\x00" in pairs else "BE" if b"\x00\n" in pairs else None


def parse_separator(separator: str) -> str:
    """``separator`` with the escapes a shell passes through as typed (``'\\n'``, ``'\\t'``, ``'\\r\\n'``) read as
    the characters they name, and Windows line ends as plain ones, as the text is read."""
    for escape, char in (("\\r", "\r"), ("\\n", "\n"), ("\\t", "\t")):
        separator = separator.replace(escape, char)
    return separator.replace("\r\n", "\n")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""What JSON's "\\ud83d" escapes decode to when their pair is missing: a str can hold it, UTF-8 cannot."""


BLANK_LINE = re.compile(r"^[^\S\n]+$", re.MULTILINE)
"""A line of spaces, tabs or ideographic spaces only: it looks blank, so it separates paragraphs as one."""


def plain_newlines(text: str) -> str:
    """``text`` with Windows (``\\r\\n``) and old Mac (``\\r``) line ends as ``\\n``, as Python's text files read
    them: a ``\\r`` left in would be a character of the vocabulary, and generated, moves the cursor back."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_documents(file: Path, separator: str = "\n\n", keep_empty: bool = False) -> list[str]:
    """Documents of one file: paragraphs of a .txt (split at ``separator``; lines of whitespace only count as
    blank), or the ``text`` field of each line of a .jsonl. Whitespace around a document is dropped, and so
    are empty documents, except a .jsonl's with ``keep_empty`` (one per record: prompts)."""
    text = plain_newlines(read_text(file))
    if file.suffix.lower() != ".jsonl":
        text = BLANK_LINE.sub("", text)
        return [doc.strip() for doc in (text.split(separator) if separator else [text]) if doc.strip()]
    docs = []
    # split at newlines only: JSON strings may hold U+2028 and other characters that str.splitlines() breaks at
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}, line {n}: not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{file}, line {n}: each line must be an object with a string field 'text'.")
        lone = LONE_SURROGATE.search(record["text"])
        if lone:  # an escape like "\ud83d" without its pair: half of a cut-off emoji, not a character
            raise ValueError(
                f"{file}, line {n}: the text holds {lone[0].encode('unicode_escape').decode()}, half of a UTF-16 "
                "surrogate pair (often an emoji cut in two), which no UTF-8 text can hold. Remove that escape "
                "or complete the pair."
            )
        if record["text"].strip() or keep_empty:
            docs.append(plain_newlines(record["text"]).strip())  # (JSON text from Windows may hold "\r\n")
    return docs


def read_prompts(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Prompts, in file order: each non-blank line of a .txt file, the ``text`` of each record of a .jsonl (an
    empty one too: generation then starts from ``<bos>``, and the outputs stay one per record)."""
    prompts = []
    for file in find_text_files(paths):
        if file.suffix.lower() == ".jsonl":
            prompts += read_documents(file, keep_empty=True)
        else:
            prompts += [line.strip() for line in read_text(file).splitlines() if line.strip()]
    return prompts


def load_corpus(paths: str | Path | Sequence[str | Path], separator: str = "\n\n") -> list[str]:
    files = find_text_files(paths)
    docs = [doc for f in files for doc in read_documents(f, separator)]
    if not docs:
        raise ValueError(f"no text found in {', '.join(map(str, files))}: the files are empty or only whitespace.")
    return docs


class EncodedCorpus:
    """Documents as one flat array of token ids (``<bos>`` text ``<eos>`` each) plus their start offsets.

    A flat uint16 array takes 2 bytes a character where a Python list of ints takes about 36, and it can
    be a memory map of a file cached on disk.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens, self.offsets = tokens, offsets

    @classmethod
    def encode(cls, docs: Sequence[str], tokenizer: CharTokenizer) -> EncodedCorpus:
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        arrays = [np.asarray(tokenizer.encode(d, add_special_tokens=True), dtype=dtype) for d in docs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        return cls(np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype), offsets)

    @classmethod
    def cached(cls, docs: Sequence[str], tokenizer: CharTokenizer, cache_dir: Path) -> EncodedCorpus:
        """Encodes once, then memory-maps the result keyed by the text and the vocabulary."""
        key = hashlib.sha256(json.dumps(tokenizer.id_to_token, ensure_ascii=False).encode())
        for doc in docs:
            data = doc.encode()
            key.update(len(data).to_bytes(8, "little"))  # with the length, no two lists of documents share a key
            key.update(data)
        stem = cache_dir / f"corpus-{key.hexdigest()[:16]}"
        tokens_file, offsets_file = stem.with_suffix(".tokens.npy"), stem.with_suffix(".offsets.npy")
        if not (tokens_file.exists() and offsets_file.exists()):
            corpus = cls.encode(docs, tokenizer)
            cache_dir.mkdir(parents=True, exist_ok=True)
            for file, array in ((tokens_file, corpus.tokens), (offsets_file, corpus.offsets)):
                # a temporary file of this process, then a rename: a crash leaves no half file, and ranks
                # writing the same cache at once do not trip over each other's
                fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy")
                with os.fdopen(fd, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, file)
        return cls(np.load(tokens_file, mmap_mode="r"), np.load(offsets_file))

    def __len__(self) -> int:
        return len(self.offsets) - 1


class TextDataset(Dataset):
    """Training examples: each item is ``(input, target)`` with ``input = tokens[:-1]``, ``target = tokens[1:]``.

    A document longer than ``max_length`` is cut into consecutive windows that overlap by one token, so
    every token is a target exactly once and nothing is dropped. With ``packing``, all documents are joined
    into one stream and cut into full windows, which leaves no padding but the last window's.
    """

    def __init__(
        self,
        texts: Sequence[str] | EncodedCorpus,
        tokenizer: CharTokenizer | None = None,
        max_length: int = 256,
        packing: bool = False,
    ) -> None:
        if max_length < 2:
            raise ValueError(
                f"max_length={max_length} is too short: a training example needs at least 2 "
                "tokens (an input and its next-token target)."
            )
        if isinstance(texts, str):
            raise ValueError("TextDataset takes a list of documents, not one string.")
        if not isinstance(texts, EncodedCorpus):
            if tokenizer is None:
                raise ValueError("TextDataset needs a tokenizer to encode raw texts.")
            texts = EncodedCorpus.encode(texts, tokenizer)
        self.corpus, self.max_length = texts, max_length
        spans = (
            [(0, len(texts.tokens))]
            if packing
            else zip(texts.offsets[:-1].tolist(), texts.offsets[1:].tolist(), strict=True)
        )
        # windows of max_length + 1 tokens, each starting where the previous one's last target was
        windows = [(s, min(s + max_length + 1, end)) for start, end in spans for s in range(start, end - 1, max_length)]
        self.windows = np.array(windows, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self) -> np.ndarray:
        return self.windows[:, 1] - self.windows[:, 0] - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.windows[index]
        tokens = torch.from_numpy(self.corpus.tokens[start:end].astype(np.int64))
        return tokens[:-1], tokens[1:]


def collate(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its own longest example: padding gets ``pad_token_id`` in ``input_ids``,
    0 in ``attention_mask`` and ``IGNORE_INDEX`` in ``labels``, so it never counts in the loss."""
    width = max(len(x) for x, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        input_ids[i, : len(x)], labels[i, : len(y)], attention_mask[i, : len(x)] = x, y, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def without_needless_mask(batch: Any) -> Any:
    """A training batch without its ``attention_mask`` when the mask only marks right padding that the loss
    skips (labels of -100): a causal model computes the same loss without it."""
    if not isinstance(batch, Mapping):
        return batch
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if (
        isinstance(mask, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and mask.shape == labels.shape
        and bool((mask[:, 1:] <= mask[:, :-1]).all())
        and bool((labels[mask == 0] == IGNORE_INDEX).all())
    ):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


class LengthBuckets(Dataset):
    """Whole batches of examples of similar length (one item = one batch), to cut padding.

    Examples are shuffled with ``seed``, sorted by length within chunks of 64 batches, and cut into
    batches; ``EpochSampler`` then shuffles the order of the batches (and deals them out to the processes).
    """

    def __init__(self, dataset: TextDataset, batch_size: int, seed: int, chunk: int = 64) -> None:
        self.dataset = dataset
        order = list(range(len(dataset)))
        random.Random(seed).shuffle(order)
        lengths = dataset.lengths()
        self.batches: list[list[int]] = []
        for c in range(0, len(order), batch_size * chunk):
            part = sorted(order[c : c + batch_size * chunk], key=lambda i: lengths[i])
            self.batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.batches[index]])


class ResumePoint(NamedTuple):
    """Where a checkpoint stopped in its epoch, in this run's items (examples, or batches when bucketed) of the
    epoch's order over all processes."""

    epoch: int
    batches: int  # Lightning's count of the epoch's batches so far, on each process
    seen: int  # the items trained on: the first ``seen`` of the order
    end: float  # where in the order the epoch ends (past the data's end when it takes all of it)
    ended: bool = False  # the checkpoint was written after the epoch's last batch


class EpochSampler(DistributedSampler):
    """This rank's share of the items (examples, or batches when bucketed), shuffled by ``seed + epoch``.

    An epoch's order over all ranks depends on nothing else (not the global random state, not earlier epochs,
    not the number of ranks): rank ``r`` of ``n`` takes its items ``r, r + n, ...``, padded as
    ``DistributedSampler`` pads. So the items a run has trained on are a prefix of that order, and a run
    resumed mid-epoch (``resume_epoch``) deals out the rest of it (from ``seen`` to ``end``, where the epoch
    stops), over as many ranks as it has: with the same ranks and batch size, exactly the batches an
    uninterrupted run would have taken. Being a ``DistributedSampler``, Lightning keeps it under DDP too.

    ``epoch_fn`` gives the epoch when iteration starts. Lightning's ``set_epoch`` is not relied on: it comes
    after the iterator exists when batches are prefetched (workers, or ``batch_size=None``), and it is one
    ahead after a restart.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch_fn = epoch_fn
        self.resume_epoch, self.seen, self.end = 0, 0, math.inf

    def set_epoch(self, epoch: int) -> None:
        if self.epoch_fn is None:
            super().set_epoch(epoch)

    def order(self) -> list[int]:
        """The epoch's order of all items, over all ranks."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.epoch_fn is not None:
            self.epoch = self.epoch_fn()
        order = self.order()
        rest = order[self.seen : int(min(self.end, len(order)))] if self.epoch == self.resume_epoch else order
        # every rank gets as many items: the last round is filled from the epoch's start, as an uninterrupted
        # epoch fills it (resumed with the checkpoint's ranks, the items seen are whole rounds: the same filling)
        rest += list(itertools.islice(itertools.cycle(order), -len(rest) % self.num_replicas))
        return iter(rest[self.rank :: self.num_replicas])


def load_tokenizer(path: str | Path) -> CharTokenizer:
    """A saved vocabulary: a ``tokenizer.json`` written by ``CharTokenizer.save``, the one inside a training
    checkpoint (``.ckpt``), or that of a directory written by ``export``."""
    from qwen3_lightning.interop import checkpoint_tokenizer, exported_tokenizer, is_export

    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):  # what torch.save writes, whatever the file is called
        return checkpoint_tokenizer(path)
    if is_export(path):
        return exported_tokenizer(path)
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("tokenizer.json"))[:3]
        raise ValueError(
            f"data.tokenizer_path={path} is a folder; give the tokenizer.json file of a run (in its "
            f"logs/version_N/{f': {found}' if found else ''}) or a checkpoint (.ckpt)."
        )
    return CharTokenizer.load(path)


class TextDataModule(L.LightningDataModule):
    """Reads raw text, builds the character vocabulary from the training split, and serves padded batches.

    The vocabulary is ready right after construction (``vocab_size``, ``tokenizer``), so LightningCLI can pass
    its size to the model, and it is saved in every checkpoint through ``state_dict``.

    Args:
        train_path: a .txt file, a .jsonl file with a ``text`` field per line, a directory searched
            recursively for both, or a list of them. With neither this nor ``texts``: the bundled Tang poems.
        texts: training documents given directly, for use from Python.
        val_path: validation data in the same forms; when None, ``val_split`` of the documents is held out.
        val_split: fraction of the training documents held out for validation (seeded); 0 for none.
        max_length: tokens per training example; longer documents are cut into consecutive windows.
        batch_size: examples per batch on each device.
        num_workers: DataLoader worker processes.
        vocab_size: the most vocabulary entries, the 4 special tokens included; None keeps every character.
            Not used with ``tokenizer_path``, nor is ``min_freq``: that vocabulary is taken as it is.
        min_freq: characters seen fewer times in the training split become ``<unk>``.
        seed: seed of the validation split, of the length buckets and of each epoch's shuffled order.
        separator: what separates documents in a .txt file (default ``\\n\\n``: a blank line); ``\\n`` and ``\\t``
            as typed on a command line mean a newline and a tab (``--data.separator '\\n'``: one document per
            line).
        bucket_by_length: batch examples of similar length together, to cut padding.
        packing: join documents with ``<eos>`` into full windows: no padding at all.
        cache_dir: keep the encoded corpus there as NumPy files, memory-mapped on later runs.
        test_path: data for the ``test`` subcommand, in the same forms as ``train_path``.
        predict_path: prompts for the ``predict`` subcommand: a .txt file with one per line, a .jsonl file with
            one ``text`` field per line, a folder of them or a list.
        tokenizer_path: use this saved vocabulary (an earlier run's ``tokenizer.json``, a checkpoint, or a
            directory written by ``export``) instead of building one from the training split; characters it
            lacks become ``<unk>``. ``validate``, ``test`` and ``predict`` with a ``--ckpt_path`` file take the
            checkpoint's, as does a resumed run that was started with one. With it, the training text is read
            only when a stage needs it (fit, and validate for a ``val_split``), so ``test`` and ``predict`` need
            no training data, nor ``validate`` with a ``val_path``.
    """

    def __init__(
        self,
        train_path: str | list[str] | None = None,
        texts: list[str] | None = None,
        val_path: str | list[str] | None = None,
        val_split: float = 0.05,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        vocab_size: int | None = None,
        min_freq: int = 1,
        seed: int = 42,
        separator: str = r"\n\n",  # written as typed, so that --help shows it; read as a blank line
        bucket_by_length: bool = False,
        packing: bool = False,
        cache_dir: str | None = None,
        test_path: str | list[str] | None = None,
        predict_path: str | list[str] | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        # as Python ints (numpy ones too), before save_hyperparameters reads them
        max_length, batch_size = (
            whole_number("data.max_length", max_length),
            whole_number("data.batch_size", batch_size),
        )
        num_workers, seed = whole_number("data.num_workers", num_workers), whole_number("data.seed", seed)
        min_freq = whole_number("data.min_freq", min_freq)
        vocab_size = whole_number("data.vocab_size", vocab_size) if vocab_size is not None else None
        if max_length < 2:
            raise ValueError(
                f"data.max_length={max_length} is too short: an example needs an input and a "
                "target token. Use at least 2 (typically 128-1024)."
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more.")
        if not 0 <= val_split < 1:
            raise ValueError(f"data.val_split={val_split} must be in [0, 1).")
        if bucket_by_length and packing:
            raise ValueError(
                "choose bucket_by_length or packing, not both: packed windows are all full length. To pack with a "
                "config that buckets (tiny.yaml, small.yaml): --data.bucket_by_length false --data.packing true."
            )
        if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise ValueError(f"data.cache_dir={cache_dir} is a file; give a folder (it is created if missing).")
        separator = parse_separator(separator)
        # vocab_size is left out: the module records the real size, and the tokenizer state records this cap
        self.save_hyperparameters(ignore=["texts", "vocab_size"])
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.bucket_by_length, self.packing, self.seed = bucket_by_length, packing, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.predict_path, self.test_path, self.separator = predict_path, test_path, separator
        self._resume: ResumePoint | None = None
        self._origin: tuple[int, int, float] | None = None  # (epoch, item at Lightning's count 0, end), when resumed

        if texts is not None and train_path is not None:
            raise ValueError("give train_path or texts, not both.")
        if isinstance(texts, str):  # a str is a sequence of one-character strings: each would be a document
            raise ValueError("texts must be a list of documents, e.g. text.split('\\n\\n'), not one string.")
        if texts is not None and not all(isinstance(t, str) for t in texts):
            kind = next(type(t).__name__ for t in texts if not isinstance(t, str))
            raise ValueError(f"texts must be a list of str documents; it holds a {kind} (decode bytes first).")
        if texts is not None and not any(t.strip() for t in texts):
            raise ValueError("texts holds no non-empty document.")
        self._texts = texts
        self._test_set: tuple[Any, TextDataset] | None = None  # (test_path, its examples)
        self._prompts: tuple[Any, list[str]] | None = None
        if tokenizer_path is not None:
            # the training text is read when a stage needs it (fit, validate): test and predict need none
            self.tokenizer = load_tokenizer(tokenizer_path)
            return
        train_docs, _ = self._documents
        self.tokenizer = CharTokenizer(vocab_size, min_freq).build_vocab(train_docs)
        if self.tokenizer.vocab_size == len(SPECIAL_TOKENS):
            raise ValueError(
                f"data.min_freq={min_freq} leaves no character in the vocabulary: none of the training split's "
                "characters occurs that often, so all would be <unk>. Lower data.min_freq (1 keeps every one)."
            )
        self.datasets()

    @cached_property
    def _documents(self) -> tuple[list[str], list[str]]:
        """The training and validation documents, read once: from ``texts`` or ``train_path``, with the
        validation ones from ``val_path`` or held out of the training documents by ``val_split``."""
        hp, separator = self.hparams, self.separator
        if self._texts is not None:
            train_docs = [t for t in self._texts if t.strip()]
        else:
            if hp.train_path is None:
                log.info("no data.train_path given: training on the bundled sample corpus %s", SAMPLE_CORPUS)
            train_docs = load_corpus(hp.train_path or SAMPLE_CORPUS, separator)
        if hp.val_path is not None:
            val_docs = self._val_path_documents
            if self._texts is None:
                resolved = [
                    {f.resolve() for f in find_text_files(p)} for p in (hp.train_path or SAMPLE_CORPUS, hp.val_path)
                ]
                shared = resolved[0] & resolved[1]
                if shared:
                    rank_zero_warn(
                        f"data.val_path and data.train_path both hold {', '.join(sorted(map(str, shared))[:3])}: the "
                        "model trains on its validation text, so val_loss (and best.ckpt's choice) says nothing of "
                        "text it has not seen. Give validation files kept out of training, or only data.val_split."
                    )
        elif hp.val_split > 0:
            order = list(range(len(train_docs)))
            random.Random(hp.seed).shuffle(order)
            n_val = round(len(train_docs) * hp.val_split)
            if n_val == 0 or n_val == len(train_docs):
                raise ValueError(
                    f"data.val_split={hp.val_split} of {len(train_docs)} document(s) leaves "
                    f"{'no validation' if n_val == 0 else 'no training'} document. Raise or lower val_split, "
                    "give data.val_path, or set val_split to 0 to train without validation."
                    + (
                        f" Documents are a .txt file's paragraphs, split at data.separator={separator!r}; for one "
                        "document per line, pass --data.separator '\\n'."
                        if len(train_docs) < 20
                        else ""
                    )
                )
            held_out = set(order[:n_val])
            val_docs = [d for i, d in enumerate(train_docs) if i in held_out]
            train_docs = [d for i, d in enumerate(train_docs) if i not in held_out]
        else:
            val_docs = []
        return train_docs, val_docs

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary built from the training data (what the model's embedding needs)."""
        return self.tokenizer.vocab_size

    @cached_property
    def _val_path_documents(self) -> list[str]:
        """The documents of ``val_path``, read once."""
        return load_corpus(self.hparams.val_path, self.separator)

    def _dataset(self, docs: list[str]) -> TextDataset:
        if self.cache_dir is not None:
            corpus = EncodedCorpus.cached(docs, self.tokenizer, self.cache_dir)
        else:
            corpus = EncodedCorpus.encode(docs, self.tokenizer)
        return TextDataset(corpus, max_length=self.max_length, packing=self.packing)

    def datasets(self) -> tuple[TextDataset, TextDataset | None]:
        """The training and validation examples (None: no validation data), read and encoded on first use."""
        return self.train_dataset, self.val_dataset

    @cached_property
    def train_dataset(self) -> TextDataset:
        """The training split's examples, encoded on first use."""
        return self._dataset(self._documents[0])

    @cached_property
    def val_dataset(self) -> TextDataset | None:
        """The validation examples (None without validation data), encoded on first use: those of ``val_path``
        (the training text is then not read), or the ones ``val_split`` holds out."""
        docs = self._val_path_documents if self.hparams.val_path is not None else self._documents[1]
        return self._dataset(docs) if docs else None

    @property
    def test_dataset(self) -> TextDataset:
        """The examples of ``test_path``, encoded on first use (and again for another ``test_path``)."""
        if self.test_path is None:
            raise ValueError(
                "test needs data: pass test_path (--data.test_path on the command line), a .txt/.jsonl file or a "
                "folder of them."
            )
        if self._test_set is None or self._test_set[0] != self.test_path:
            self._test_set = self.test_path, self._dataset(load_corpus(self.test_path, self.separator))
        return self._test_set[1]

    @property
    def prompts(self) -> list[str]:
        """The prompts of ``predict_path``, read on first use (and again for another ``predict_path``)."""
        if self.predict_path is None:
            raise ValueError(
                "predict needs prompts: pass predict_path (--data.predict_path on the command line), a text file "
                "with one prompt per line."
            )
        if self._prompts is None or self._prompts[0] != self.predict_path:
            prompts = read_prompts(self.predict_path)
            if not prompts:
                raise ValueError(f"{self.predict_path} holds no prompt: write one prompt per line.")
            self._prompts = self.predict_path, prompts
        return self._prompts[1]

    def setup(self, stage: str) -> None:
        self._resume = self._origin = None  # a checkpoint's position is restored after this, for this fit only
        # read now, so that a bad data path stops the run before its first step. (Without test_path or
        # predict_path, the run may bring its own data loaders: only this module's say that one is missing.)
        if stage == TrainerFn.FITTING:
            self.datasets()
            self.check_training_text()
            self._warn_of_unknown_characters(self.train_dataset, "training")
            self._warn_of_unknown_characters(self.val_dataset, "validation")
            if self.trainer is not None:
                self.check_early_stopping(self.trainer.callbacks)
        elif stage == TrainerFn.VALIDATING:
            self._warn_of_unknown_characters(self.val_dataset, "validation")
        elif stage == TrainerFn.TESTING and self.test_path is not None:
            self._warn_of_unknown_characters(self.test_dataset, "test")
        elif stage == TrainerFn.PREDICTING and self.predict_path is not None:
            _ = self.prompts
        if self.trainer is None or not self.trainer.loggers:  # no logger, no log folder (not the working directory)
            return
        log_dir = self.trainer.log_dir  # on every rank: under DDP, reading it is a collective broadcast
        if self.trainer.is_global_zero and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(Path(log_dir) / "tokenizer.json")

    def check_early_stopping(self, callbacks: list[L.Callback]) -> None:
        """Early stopping on a validation metric needs validation data: without, Lightning would raise after the
        first training epoch, before any checkpoint is written."""
        from lightning.pytorch.callbacks import EarlyStopping

        if self.val_dataset is not None:
            return
        for callback in callbacks:
            if isinstance(callback, EarlyStopping) and callback.monitor.startswith("val"):
                raise ValueError(
                    f"EarlyStopping monitors {callback.monitor}, but this run has no validation data "
                    f"(data.val_split={self.hparams.val_split} and no data.val_path). Give validation data, or "
                    "drop the EarlyStopping callback."
                )

    def check_training_text(self) -> None:
        """Refuses training text that is over half ``<unk>``: a run that would learn mostly ``<unk>`` (the CLI
        checks before the log folder is made)."""
        unknown = self._unknown_characters(self.train_dataset, "training")
        if unknown is not None and unknown[0] > 0.5:
            raise ValueError(f"{unknown[1]} (Refused: over 50% is a run that would learn mostly <unk>.)")

    def _warn_of_unknown_characters(self, dataset: TextDataset | None, split: str) -> None:
        unknown = self._unknown_characters(dataset, split)
        if unknown is not None:
            rank_zero_warn(unknown[1])

    def _unknown_characters(self, dataset: TextDataset | None, split: str) -> tuple[float, str] | None:
        """The share of a split's text that is ``<unk>`` and what to say of it, where that share is much: from a
        vocabulary of another corpus (``tokenizer_path``: fine-tuning, or a checkpoint's for validate and test),
        or a ``min_freq`` or ``vocab_size`` that drops many characters. Training text: over 1% (and refused over
        50% by ``check_training_text``: a run that would learn mostly ``<unk>``). Text that is evaluated: over 20%,
        since a few rare characters of held-out text always miss from the training text (2.8% of the sample
        corpus's validation split); more leaves its loss, and so best.ckpt, saying little of the model."""
        if dataset is None:
            return None
        corpus = dataset.corpus
        characters = len(corpus.tokens) - 2 * len(corpus)  # each document's <bos> and <eos> are not text
        unknown = int(np.count_nonzero(corpus.tokens == self.tokenizer.unk_token_id))
        if not characters or unknown / characters <= (0.01 if split == "training" else 0.2):
            return None
        tokenizer, path = self.tokenizer, self.hparams.tokenizer_path
        if path:
            checkpoint = Path(path).is_file() and zipfile.is_zipfile(path)  # (what torch.save writes)
            whose = f"the checkpoint {path}" if checkpoint else f"data.tokenizer_path={path}"
            cause = f"the vocabulary of {whose} lacks them"
            fix = (
                "A model that is to write them needs a vocabulary built from this text: a new run, without "
                "data.tokenizer_path and model.initial_checkpoint."
                if split == "training"
                else "The model never saw them in training."
            )
        elif tokenizer.min_freq <= 1 and tokenizer.vocab_size < (tokenizer.max_vocab_size or math.inf):  # none dropped
            cause = "they do not occur in the training text, from which the vocabulary is built"
            fix = "Train on text that holds them too (a larger or more varied training set)."
        else:
            cause = f"data.min_freq={self.hparams.min_freq} or the vocabulary's size cap (data.vocab_size) drops them"
            fix = "Lower data.min_freq, or raise data.vocab_size, to keep them."
        effect = (
            "The model learns nothing of them and writes <unk> in their place."
            if split == "training"
            else "The loss counts each as the one token <unk>, so it says little of this text."
        )
        message = (
            f"{unknown / characters:.1%} of the {split} characters ({unknown:,} of {characters:,}) are read as "
            f"<unk>: {cause}. {effect} {fix}"
        )
        return unknown / characters, message

    def _loader(self, dataset: TextDataset, shuffle: bool) -> DataLoader:
        items: Dataset = LengthBuckets(dataset, self.batch_size, self.seed) if self.bucket_by_length else dataset
        trainer = self.trainer
        sampler = EpochSampler(
            items,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=shuffle,
            seed=self.seed,
            epoch_fn=self._current_epoch if trainer else None,
        )
        if shuffle and self._resume is not None and not self._resume.ended:
            sampler.resume_epoch, sampler.seen, sampler.end = self._resume.epoch, self._resume.seen, self._resume.end
        return DataLoader(
            items,
            batch_size=None if self.bucket_by_length else self.batch_size,
            sampler=sampler,
            collate_fn=None if self.bucket_by_length else collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Right padding needs no mask: under causal attention no real token sees the padding after it, and
        # Qwen3LightningModule's loss skips padded positions. Without a mask, attention runs on its fastest
        # (flash) kernels. Checked here, on the CPU, before the batch moves to the device, so that it costs no
        # device sync. Other LightningModules get the batches whole.
        from qwen3_lightning.module import Qwen3LightningModule

        module = self.trainer.lightning_module if self.trainer is not None else None
        return without_needless_mask(batch) if isinstance(module, Qwen3LightningModule) else batch

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_dataset, shuffle=True)
        if self._resume is not None:
            self._count_the_rest_of_the_epoch(loader, self._resume)
        return loader

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch  # a method, not a lambda: the loaders (and so the Trainer) stay picklable

    def _count_the_rest_of_the_epoch(self, loader: DataLoader, resume: ResumePoint) -> None:
        """Sets Lightning's count of the resumed epoch's batches so that it takes the rest of the epoch, as
        the sampler deals it out. With the processes and batch size the checkpoint was written with, the count
        is the checkpoint's; with others, Lightning would count the rest in this run's batches per epoch and
        take too many or stop short of it (or end the epoch at once, with more processes).

        Called while Lightning sets up its training data, after it restored its loops from the checkpoint and
        before the epoch's first batch.
        """
        trainer = self.trainer
        count = trainer.fit_loop.epoch_loop.batch_progress.current
        if count.processed != resume.batches or not (resume.ended or trainer.current_epoch == resume.epoch):
            return  # not the resumed epoch's start (a reload of the data later on)
        limit = trainer.limit_train_batches  # what Lightning makes of len(loader), as it does
        batches = min(len(loader), limit) if isinstance(limit, int) else int(len(loader) * limit)
        if resume.ended:  # at the end in this run's count too, or Lightning would go on with the next epoch's data
            start = max(batches, count.processed)
        else:
            rest = min(resume.end, len(loader.sampler.dataset)) - resume.seen
            start = max(batches - math.ceil(math.ceil(rest / trainer.world_size) / self._per_batch()), 0)
        shift = start - count.processed
        count.ready, count.started = count.ready + shift, count.started + shift
        count.processed, count.completed = count.processed + shift, count.completed + shift
        if not resume.ended:  # so that a checkpoint later in this epoch says which items its count stands for
            self._origin = (resume.epoch, resume.seen - start * self._per_step(), resume.end)

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """The training batches of an epoch on each of ``world_size`` processes, as the loader deals them out."""
        items = (
            math.ceil(len(self.train_dataset) / self.batch_size) if self.bucket_by_length else len(self.train_dataset)
        )
        return math.ceil(math.ceil(items / world_size) / self._per_batch())

    def _per_batch(self) -> int:
        """Items in a batch: examples, or one batch of them when bucketed."""
        return 1 if self.bucket_by_length else self.batch_size

    def _per_step(self) -> int:
        """Items of the epoch's order that a training step takes: a batch on every process."""
        return self._per_batch() * (self.trainer.world_size if self.trainer else 1)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.batch_size, collate_fn=self.collate_prompts)

    def collate_prompts(self, prompts: list[str]) -> dict[str, Any]:
        """Prompts after ``<bos>``, left-padded for batched generation."""
        from qwen3_lightning.generation import encode_prompt

        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        width = max(map(len, encoded))
        input_ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids) :], attention_mask[i, width - len(ids) :] = torch.tensor(ids), 1
        return {"prompts": prompts, "input_ids": input_ids, "attention_mask": attention_mask}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> TextDataModule:
        """Lightning's ``load_from_checkpoint``; from a local file, with the checkpoint's vocabulary (as
        ``tokenizer_path``, unless given): its saved hyperparameters leave out the ``vocab_size`` cap, and the
        vocabulary it built is in the checkpoint anyway. The training text is then read only when a stage needs
        it. From a URL, the vocabulary is built from the training text again (pass ``vocab_size`` if it was
        capped) and checked against the checkpoint's."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_file():  # not a URL
            kwargs.setdefault("tokenizer_path", str(checkpoint_path))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tokenizer": self.tokenizer.to_dict()}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            # where the epoch stands, so that a resumed run starts at the next unseen batch. The batch count
            # belongs to the last epoch started, which may already count as completed (current_epoch is then
            # one ahead of it)
            fit = trainer.fit_loop
            epoch = max(fit.epoch_progress.current.started - 1, 0)
            done = fit.epoch_loop.batch_progress.current.processed
            origin, end = 0, trainer.num_training_batches * self._per_step()
            if self._origin is not None and self._origin[0] == epoch:  # an epoch resumed in other batches
                _, origin, end = self._origin
            state["position"] = {
                "epoch": epoch,
                "batches": done,
                "epoch_batches": trainer.num_training_batches,
                "seen": origin + done * self._per_step(),  # items of the epoch's order trained on
                "end": end,
                "world_size": trainer.world_size,
                "batch_size": self.batch_size,
                "bucket_by_length": self.bucket_by_length,
            }
        return state

    def _resume_point(self, position: dict[str, Any]) -> ResumePoint:
        """Where to resume a checkpoint's epoch. When the epoch's items are not this run's (length buckets
        switched on or off, or buckets of another batch size), the rest of the epoch is drawn afresh, as many
        examples as it had left, with a warning."""
        if position["batches"] >= position.get("epoch_batches", math.inf):
            return ResumePoint(position["epoch"], position["batches"], 0, math.inf, ended=True)
        # checkpoints before 2026-12-01 lack batch_size, bucket_by_length and epoch_batches, and seen and end
        saved = {
            "world_size": position["world_size"],
            "batch_size": position.get("batch_size", self.batch_size),
            "bucket_by_length": position.get("bucket_by_length", self.bucket_by_length),
        }
        now = {
            "world_size": self.trainer.world_size,
            "batch_size": self.batch_size,
            "bucket_by_length": self.bucket_by_length,
        }
        changed = [name for name in saved if saved[name] != now[name]]
        said = ", ".join(f"{name}={saved[name]} (now {now[name]})" for name in changed)
        per_step = saved["world_size"] * (1 if saved["bucket_by_length"] else saved["batch_size"])
        seen = position.get("seen", position["batches"] * per_step)
        end = position.get("end", position.get("epoch_batches", math.inf) * per_step)
        if "bucket_by_length" in changed or (self.bucket_by_length and "batch_size" in changed):
            rank_zero_warn(
                f"the checkpoint was written mid-epoch with {said}: the epoch's batches are not this run's, so the "
                "rest of the interrupted epoch is drawn afresh, as many examples as it had left: in that epoch "
                "only, some examples may be seen twice, others not at all."
            )
            # in examples: an item of the checkpoint's or of this run's is a whole batch when bucketed
            saved_item = saved["batch_size"] if saved["bucket_by_length"] else 1
            item = self.batch_size if self.bucket_by_length else 1
            left = min(end * saved_item, len(self.train_dataset)) - seen * saved_item
            return ResumePoint(position["epoch"], position["batches"], 0, math.ceil(left / item))
        if changed:
            rank_zero_info(
                f"The checkpoint was written mid-epoch with {said}: the rest of epoch {position['epoch']} is dealt "
                "out to this run's processes and batches."
            )
        return ResumePoint(position["epoch"], position["batches"], seen, end)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("position")
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING  # (not validate's)
        if position and fitting and position["batches"]:
            self._resume = self._resume_point(position)
        self.check_vocabulary(state_dict)

    def check_vocabulary(self, state_dict: dict[str, Any]) -> None:
        """Refuses a checkpoint's DataModule state whose vocabulary is not this one, which would renumber the
        characters under the trained weights."""
        saved = CharTokenizer.from_dict(state_dict["tokenizer"], source="the checkpoint")
        if saved != self.tokenizer:
            how = "the same size, in another order" if saved.vocab_size == self.vocab_size else "another size"
            raise ValueError(
                vocabulary_mismatch(
                    f"the checkpoint's vocabulary has {saved.vocab_size} tokens",
                    self.hparams.tokenizer_path,
                    f"{self.vocab_size} ({how})",
                )
            )
