"""Reading text, windowing into examples, padding, length buckets, and the TextDataModule."""

import bz2
import gzip
import json
import lzma
import math
import random
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3_lightning import data as data_mod
from qwen3_lightning.data import (
    IGNORE_INDEX,
    SAMPLE_CORPUS,
    EncodedCorpus,
    EpochSampler,
    LengthBuckets,
    TextDataModule,
    TextDataset,
    collate,
    find_text_files,
    load_corpus,
    plain_newlines,
    read_documents,
    read_prompts,
)
from qwen3_lightning.tokenizer import CharTokenizer

PROPERTY = settings(max_examples=60, deadline=None)
ZH_ALPHABET = "春眠不觉晓处闻啼鸟夜来风雨声花落知多少，。！？「」\n "


def tokens_of(doc: str, tok: CharTokenizer) -> list[int]:
    return tok.encode(doc, add_special_tokens=True)


def items(dataset) -> list[tuple[list[int], list[int]]]:
    return [(x.tolist(), y.tolist()) for x, y in (dataset[i] for i in range(len(dataset)))]


def docs_in(dataset: TextDataset, tok: CharTokenizer) -> list[str]:
    """The documents of a dataset whose max_length holds each document in one window."""
    out = []
    for x, y in items(dataset):
        assert x[0] == tok.bos_token_id and y[-1] == tok.eos_token_id, "a document was cut into windows"
        out.append(tok.decode(x, skip_special_tokens=False)[len(tok.bos_token) :])
    return out


def as_seen(doc: str, tok: CharTokenizer) -> str:
    """``doc`` as the tokenizer sees it: characters outside its vocabulary shown as ``<unk>``."""
    return tok.decode(tok.encode(doc), skip_special_tokens=False)


def padding_fraction(batches) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / total


def many_docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of mixed lengths; document i holds one character no other document holds."""
    rnd = random.Random(seed)
    common = "天地玄黄宇宙洪荒日月盈昃辰宿列张，。"
    return [chr(0x4E00 + 500 + i) + "".join(rnd.choices(common, k=rnd.randint(1, 60))) for i in range(n)]


# ---------------------------------------------------------------- find_text_files


def test_find_text_files_single_file(zh_corpus_file):
    assert find_text_files(zh_corpus_file) == [zh_corpus_file]
    assert find_text_files(str(zh_corpus_file)) == [zh_corpus_file]


def test_find_text_files_directory_is_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "data"
    for rel in ["b.txt", "a.jsonl", "sub/deeper/c.txt", "sub/a.txt", "notes.md", "table.csv", "sub/x.json"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("诗", encoding="utf-8")
    (root / "dir.txt").mkdir()  # a directory with a text suffix is not a file
    found = find_text_files(root)
    assert found == [root / "a.jsonl", root / "b.txt", root / "sub" / "a.txt", root / "sub" / "deeper" / "c.txt"]
    assert found == sorted(found)


def test_find_text_files_takes_any_case_of_suffix_and_skips_hidden_files_and_folders(tmp_path):
    root = tmp_path / "data"
    rels = ["A.TXT", "b.Jsonl", ".ipynb_checkpoints/A-checkpoint.txt", ".notes.txt", "sub/.git/x.txt", "sub/c.txt"]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('{"text": "诗"}' if rel.endswith("l") else "诗", encoding="utf-8")
    assert find_text_files(root) == [root / "A.TXT", root / "b.Jsonl", root / "sub" / "c.txt"]
    assert read_documents(root / "b.Jsonl") == ["诗"]  # read as JSON lines, whatever the case of its suffix
    hidden_only = tmp_path / "hidden"
    (hidden_only / ".cache").mkdir(parents=True)
    (hidden_only / ".cache" / "a.txt").write_text("诗", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="hidden ones are not searched"):
        find_text_files(hidden_only)


def test_find_text_files_list_keeps_the_given_order(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "2.txt").write_text("二", encoding="utf-8")
    (d / "1.txt").write_text("一", encoding="utf-8")
    single = tmp_path / "z.jsonl"
    single.write_text('{"text": "零"}\n', encoding="utf-8")
    assert find_text_files([single, str(d)]) == [single, d / "1.txt", d / "2.txt"]


def test_find_text_files_missing_path_is_named(tmp_path, zh_corpus_file):
    missing = tmp_path / "不存在.txt"
    with pytest.raises(FileNotFoundError) as err:
        find_text_files([zh_corpus_file, missing])
    assert str(missing) in str(err.value)


def test_find_text_files_directory_without_text_files(tmp_path):
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as err:
        find_text_files(tmp_path)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------- read_documents


def test_txt_is_split_on_blank_lines(zh_corpus_file, zh_docs):
    assert read_documents(zh_corpus_file) == zh_docs


def test_txt_split_drops_surrounding_whitespace_and_empty_documents(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("\n\n  床前明月光，\n疑是地上霜。  \n\n\n\n举头望明月。\n\n   \n\n", encoding="utf-8")
    assert read_documents(path) == ["床前明月光，\n疑是地上霜。", "举头望明月。"]


def test_lines_of_only_whitespace_separate_paragraphs_like_blank_lines(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("床前明月光，\n疑是地上霜。\n \t\n举头望明月。\n\u3000\n低头思故乡。\r\n  \r\n完", encoding="utf-8")
    assert read_documents(path) == ["床前明月光，\n疑是地上霜。", "举头望明月。", "低头思故乡。", "完"]


def test_txt_crlf_and_bom_read_like_lf(tmp_path, zh_docs):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(zh_docs).replace("\n", "\r\n").encode("utf-8"))
    assert read_documents(path) == zh_docs


def test_old_mac_line_ends_and_crlf_inside_jsonl_text_read_like_lf(tmp_path, zh_docs):
    mac = tmp_path / "mac.txt"  # a lone \r ends lines (classic Mac OS, Excel for Mac's "Text (Macintosh)")
    mac.write_bytes("\n\n".join(zh_docs).replace("\n", "\r").encode("utf-8"))
    records = tmp_path / "windows.jsonl"  # text taken from Windows files, its line ends escaped in the JSON
    records.write_bytes(b"\r\n".join(json.dumps({"text": d.replace("\n", "\r\n")}).encode() for d in zh_docs))
    assert read_documents(mac) == read_documents(records) == zh_docs
    module = TextDataModule(train_path=[str(mac), str(records)], val_split=0)
    assert "\r" not in module.tokenizer.token_to_id  # nor would it be generated


def test_txt_custom_separator(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_text("一\n\n二###三###\n###四", encoding="utf-8")
    assert read_documents(path, separator="###") == ["一\n\n二", "三", "四"]
    assert read_documents(path, separator="\n") == ["一", "二###三###", "###四"]


@pytest.mark.parametrize(
    ("typed", "docs"),
    [
        ("\\n", ["一\t二", "三", "四\t五"]),
        ("\n", ["一\t二", "三", "四\t五"]),
        ("\\r\\n\\r\\n", ["一\t二\n三", "四\t五"]),
        ("\\t", ["一", "二\n三\n\n四", "五"]),
    ],
)
def test_separator_escapes_typed_on_a_command_line_mean_the_characters(tmp_path, typed, docs):
    path = tmp_path / "lines.txt"
    path.write_bytes("一\t二\r\n三\r\n\r\n四\t五".encode())
    dm = TextDataModule(train_path=str(path), separator=typed, val_split=0)
    corpus = dm.train_dataset.corpus
    spans = zip(corpus.offsets[:-1], corpus.offsets[1:], strict=True)
    assert [dm.tokenizer.decode(corpus.tokens[a:b]) for a, b in spans] == docs


def test_the_default_separator_is_a_blank_line_and_help_shows_it(tmp_path, capsys):
    from qwen3_lightning.cli import main

    path = tmp_path / "lines.txt"
    path.write_bytes("一\t二\r\n三\r\n\r\n四\t五".encode())
    dm = TextDataModule(train_path=str(path), val_split=0)
    corpus = dm.train_dataset.corpus
    spans = zip(corpus.offsets[:-1], corpus.offsets[1:], strict=True)
    assert [dm.tokenizer.decode(corpus.tokens[a:b]) for a, b in spans] == ["一\t二\n三", "四\t五"]
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "(type: str, default: \\n\\n)" in " ".join(capsys.readouterr().out.split())


def test_jsonl_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "床前明月光", "id": 1}, ensure_ascii=False),
        "",
        json.dumps({"text": "  疑是\n地上霜  "}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "「举头」", "meta": {"x": [1]}}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_documents(path) == ["床前明月光", "疑是\n地上霜", "「举头」"]
    # a .jsonl is never split at the separator
    assert read_documents(path, separator="明") == ["床前明月光", "疑是\n地上霜", "「举头」"]


def test_jsonl_text_holding_unicode_line_separators(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: they are legal inside a
    # JSON string, and they do not end a JSON Lines record (only "\n" does).
    texts = ["第一行\u2028第二行", "段落\u2029下一段", "NEL\x85字"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert read_documents(path) == texts


@PROPERTY
@given(st.lists(st.text(max_size=20), max_size=6), st.booleans())
@example(["行\u2028分隔"], False)
def test_jsonl_round_trip_any_text(texts, ensure_ascii):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "docs.jsonl"
        body = "".join(json.dumps({"text": t}, ensure_ascii=ensure_ascii) + "\n" for t in texts)
        path.write_text(body, encoding="utf-8", newline="")
        assert read_documents(path) == [plain_newlines(t).strip() for t in texts if t.strip()]


@pytest.mark.parametrize(
    ("bad", "why"),
    [("{not json", "JSON"), ('["a list"]', "text"), ('{"txt": "typo"}', "text"), ('{"text": 3}', "text")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, why):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "好"}\n\n' + bad + '\n{"text": "坏"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        read_documents(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert why in msg


def test_jsonl_lone_surrogate_escape_names_file_and_line(tmp_path):
    # "\ud83d" without its pair (an emoji cut in two) decodes to a str that no UTF-8 file or hash can hold
    path = tmp_path / "scraped.jsonl"
    path.write_text('{"text": "好 \\ud83d\\ude00"}\n{"text": "坏 \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"scraped.jsonl, line 2: the text holds \\ud83d, half of a UTF-16"):
        read_documents(path)
    path.write_text('{"text": "好 \\ud83d\\ude00"}\n', encoding="utf-8")
    assert read_documents(path) == ["好 \U0001f600"]  # a whole pair is one character


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_file_names_file_and_byte_offset(tmp_path, suffix):
    prefix = "你好\n".encode()  # 7 bytes of valid UTF-8
    path = tmp_path / f"gbk{suffix}"
    path.write_bytes(prefix + "中文".encode("gbk"))
    with pytest.raises(ValueError) as err:
        read_documents(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"byte {len(prefix)}" in msg
    assert repr(path.read_bytes()[len(prefix) : len(prefix) + 1]) in msg
    assert "-f GB18030" in msg and "-f CP1252" in msg  # Chinese or Western European: the bytes cannot tell


@pytest.mark.parametrize(("platform", "said"), [("win32", True), ("darwin", False), ("linux", False)])
def test_non_utf8_file_on_windows_names_notepad(tmp_path, monkeypatch, platform, said):
    path = tmp_path / "gbk.txt"  # what Notepad and most editors on Chinese Windows save by default ("ANSI")
    path.write_bytes("春眠不觉晓".encode("gbk"))
    monkeypatch.setattr(sys, "platform", platform)
    with pytest.raises(ValueError, match=r"gbk.txt is not UTF-8 text: .*iconv -f GB18030") as err:
        read_documents(path)
    assert str(err.value).endswith("On Windows, Notepad converts it: File > Save As, Encoding: UTF-8.") == said


@pytest.mark.parametrize(
    ("text", "encoding", "message"),
    [
        # ASCII decodes as UTF-8 with a NUL byte between characters: refused, not trained on as half NULs
        ("Spring sleep.\n\nBirds sing.", "utf-16-le", r"is 50% NUL bytes, which no text is: .*iconv -f UTF-16LE -t"),
        ("Spring sleep.\n\nBirds sing.", "utf-16-be", r"is 50% NUL bytes, which no text is: .*iconv -f UTF-16BE -t"),
        # Chinese does not decode; the NUL bytes of its newlines tell UTF-16 from GBK, and their side the order
        # (一 is 00 4e in little-endian order: a NUL where big-endian ASCII has one)
        ("一二三四五六七八九十\n春眠不觉晓\n\n处处闻啼鸟", "utf-16-le", r"is not UTF-8 text: .* `iconv -f UTF-16LE -t"),
        ("一二三四五六七八九十\n春眠不觉晓\n\n处处闻啼鸟", "utf-16-be", r"is not UTF-8 text: .* `iconv -f UTF-16BE -t"),
    ],
)
def test_utf16_without_a_byte_order_mark_is_named(tmp_path, text, encoding, message):
    path = tmp_path / "u16.txt"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_a_stray_nul_in_other_text_is_no_sign_of_utf16(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café\x00 au lait\net crème\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"byte 3 is b'\\xe9'. Convert it, e.g. `iconv -f GB18030 .* or -f CP1252"):
        read_documents(path)


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        (gzip.compress, r"poems.txt is a gzip-compressed file, not text: unpack it first \(`gunzip -k poems.txt`\)"),
        (bz2.compress, r"is a bzip2-compressed file, not text: unpack it first \(`bunzip2 -k"),
        (lzma.compress, r"is an xz-compressed file, not text: unpack it first \(`unxz -k"),
    ],
)
def test_a_compressed_file_is_told_to_be_unpacked(tmp_path, pack, message):
    path = tmp_path / "poems.txt"
    path.write_bytes(pack("春眠不觉晓，处处闻啼鸟。".encode() * 20))
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_text_that_only_looks_compressed_or_holds_a_stray_nul_is_read_as_before(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("BZh91 春眠不觉晓".encode("gbk"))  # GBK that starts like bzip2's magic: a GBK hint
    with pytest.raises(ValueError, match=r"is not UTF-8 text: .*-f GB18030"):
        read_documents(path)
    path.write_bytes("春眠不觉晓\n".encode() * 200 + b"\x00" + "处处闻啼鸟\n".encode() * 200)
    assert "\x00" in "".join(read_documents(path, separator="\n"))


def test_utf8_cut_in_the_middle_of_a_character_says_so(tmp_path):
    path = tmp_path / "tail.txt"
    path.write_bytes("春眠不觉晓\n处处闻啼鸟".encode()[2:])  # what tail -c leaves: the last byte of 春 first
    with pytest.raises(ValueError, match=r"starts in the middle of a UTF-8 character .* drop its first 1 byte"):
        read_documents(path)
    path.write_bytes("春眠不觉晓\n处处闻啼鸟".encode()[:-1])  # what head -c leaves: 鸟 without its last byte
    with pytest.raises(ValueError, match=r"ends in the middle of a UTF-8 character \(its last 2 byte\(s\)\)"):
        read_documents(path)
    path.write_bytes("plain English text, then an em dash —".encode()[:-1])  # its only character beyond ASCII
    with pytest.raises(ValueError, match=r"ends in the middle of a UTF-8 character \(its last 2 byte\(s\)\)"):
        read_documents(path)


def test_non_utf8_offset_counts_the_bom(tmp_path):
    # the offset must point into the file as it is on disk, where a UTF-8 BOM takes 3 bytes
    raw = b"\xef\xbb\xbf" + "你好\n".encode() + "中文".encode("gbk")
    path = tmp_path / "bom_then_gbk.txt"
    path.write_bytes(raw)
    offset = len(b"\xef\xbb\xbf" + "你好\n".encode())
    with pytest.raises(ValueError) as err:
        read_documents(path)
    msg = str(err.value)
    assert f"byte {offset} is {raw[offset : offset + 1]!r}" in msg


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_raises(tmp_path, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    assert read_documents(path) == []
    assert read_documents(path, separator="") == []  # the whole file as one document: still none
    with pytest.raises(ValueError) as err:
        load_corpus(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError):
        TextDataModule(train_path=str(path), val_split=0)


def test_load_corpus_concatenates_files_in_order(tmp_path, zh_docs):
    (tmp_path / "a.txt").write_text("\n\n".join(zh_docs[:2]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in zh_docs[2:]), encoding="utf-8"
    )
    assert load_corpus(tmp_path) == zh_docs


# ---------------------------------------------------------------- TextDataset


@pytest.fixture(scope="module")
def zh_tok() -> CharTokenizer:
    return CharTokenizer().build_vocab([ZH_ALPHABET])


def test_item_is_input_and_shifted_target(zh_tok):
    doc = "春眠不觉晓，处处闻啼鸟。"
    ds = TextDataset([doc], zh_tok, max_length=64)
    assert len(ds) == 1
    x, y = ds[0]
    tokens = tokens_of(doc, zh_tok)
    assert x.dtype == y.dtype == torch.long
    assert x.tolist() == tokens[:-1]
    assert y.tolist() == tokens[1:]


def test_exact_fit_is_one_window(zh_tok):
    doc = "春眠不觉晓"  # 5 chars + bos + eos = 7 tokens -> 6 inputs
    assert len(TextDataset([doc], zh_tok, max_length=6)) == 1
    assert len(TextDataset([doc], zh_tok, max_length=5)) == 2


def test_long_document_is_cut_into_overlapping_windows(zh_tok):
    doc = "春眠不觉晓处处闻啼鸟夜来风雨声"  # 17 tokens -> 16 targets -> windows of 5, 5, 5, 1
    ds = TextDataset([doc], zh_tok, max_length=5)
    tokens = tokens_of(doc, zh_tok)
    got = items(ds)
    assert [len(x) for x, _ in got] == [5, 5, 5, 1]
    assert got[1][0][0] == got[0][1][-1]  # the next window's first input is the previous window's last target
    assert [t for _, y in got for t in y] == tokens[1:]


@PROPERTY
@given(st.lists(st.text(alphabet=ZH_ALPHABET + "?", max_size=40), min_size=1, max_size=6), st.integers(2, 12))
def test_windows_lose_no_token(zh_tok, docs, max_length):
    ds = TextDataset(docs, zh_tok, max_length=max_length)
    got = items(ds)
    assert len(ds) == sum(math.ceil((len(d) + 1) / max_length) for d in docs)
    per_doc: list[list[int]] = []
    for x, y in got:
        assert 1 <= len(x) == len(y) <= max_length
        assert x[1:] == y[:-1]
        assert zh_tok.bos_token_id not in y  # no window crosses into the next document
        if x[0] == zh_tok.bos_token_id:
            per_doc.append([])
        else:
            assert per_doc and per_doc[-1][-1] == x[0]
        per_doc[-1].extend(y)
    assert per_doc == [tokens_of(d, zh_tok)[1:] for d in docs]


@PROPERTY
@given(st.lists(st.text(alphabet=ZH_ALPHABET, max_size=40), min_size=1, max_size=6), st.integers(2, 12))
def test_packing_windows_are_full_and_cover_the_stream(zh_tok, docs, max_length):
    ds = TextDataset(docs, zh_tok, max_length=max_length, packing=True)
    stream = [t for d in docs for t in tokens_of(d, zh_tok)]
    got = items(ds)
    assert len(ds) == math.ceil((len(stream) - 1) / max_length)
    assert all(len(x) == max_length for x, _ in got[:-1])
    assert 1 <= len(got[-1][0]) <= max_length
    assert got[0][0][0] == zh_tok.bos_token_id
    for x, y in got:
        assert x[1:] == y[:-1]
    assert [t for _, y in got for t in y] == stream[1:]
    assert np.array_equal(ds.lengths(), [len(x) for x, _ in got])


def test_dataset_from_encoded_corpus_matches_raw_texts(zh_tok, zh_docs):
    tok = CharTokenizer().build_vocab(zh_docs)
    corpus = EncodedCorpus.encode(zh_docs, tok)
    assert len(corpus) == len(zh_docs)
    assert corpus.tokens.tolist() == [t for d in zh_docs for t in tokens_of(d, tok)]
    assert items(TextDataset(corpus, max_length=7)) == items(TextDataset(zh_docs, tok, max_length=7))


@pytest.mark.parametrize("max_length", [-1, 0, 1])
def test_max_length_below_two_raises(zh_tok, max_length):
    with pytest.raises(ValueError, match="max_length"):
        TextDataset(["春"], zh_tok, max_length=max_length)
    with pytest.raises(ValueError, match="max_length"):
        TextDataModule(texts=["春眠"], val_split=0, max_length=max_length)


def test_raw_texts_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        TextDataset(["春"])


# ---------------------------------------------------------------- collate


def test_collate_pads_to_the_longest_in_the_batch(zh_tok):
    docs = ["春", "春眠不觉晓处处", "春眠不"]
    ds = TextDataset(docs, zh_tok, max_length=100)
    examples = [ds[i] for i in range(len(ds))]
    batch = collate(examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    width = max(len(x) for x, _ in examples)
    assert width < 100
    for key in batch:
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for i, (x, y) in enumerate(examples):
        n = len(x)
        assert batch["input_ids"][i, :n].tolist() == x.tolist()
        assert batch["labels"][i, :n].tolist() == y.tolist()
        assert batch["attention_mask"][i, :n].eq(1).all()
        assert batch["input_ids"][i, n:].eq(zh_tok.pad_token_id).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i, n:].eq(0).all()
    # labels are the inputs shifted by one wherever both are real tokens
    real = batch["attention_mask"][:, 1:].bool()
    assert torch.equal(batch["labels"][:, :-1][real], batch["input_ids"][:, 1:][real])
    assert IGNORE_INDEX == -100


def test_collate_custom_pad_id():
    examples = [(torch.tensor([5, 6]), torch.tensor([6, 7])), (torch.tensor([5]), torch.tensor([9]))]
    batch = collate(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6], [5, 3]]
    assert batch["labels"].tolist() == [[6, 7], [9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


# ---------------------------------------------------------------- LengthBuckets


@pytest.fixture(scope="module")
def mixed_dataset():
    docs = many_docs(300)
    tok = CharTokenizer().build_vocab(docs)
    return TextDataset(docs, tok, max_length=64), tok


@pytest.mark.parametrize("batch_size", [1, 7, 16])
def test_length_buckets_cover_every_example_once(mixed_dataset, batch_size):
    ds, _ = mixed_dataset
    buckets = LengthBuckets(ds, batch_size=batch_size, seed=3, chunk=2)
    assert len(buckets) == math.ceil(len(ds) / batch_size)
    seen = Counter()
    for b in range(len(buckets)):
        batch = buckets[b]
        assert 1 <= batch["input_ids"].shape[0] <= batch_size
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            seen[tuple(row[mask.bool()].tolist())] += 1
    expected = Counter(tuple(x) for x, _ in items(ds))
    assert seen == expected
    assert sum(seen.values()) == len(ds)


def test_length_buckets_pad_less_than_random_batches(mixed_dataset):
    ds, _ = mixed_dataset
    batch_size = 8
    buckets = LengthBuckets(ds, batch_size=batch_size, seed=0)
    bucketed = [buckets[b] for b in range(len(buckets))]
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    shuffled = [collate([ds[i] for i in order[b : b + batch_size]]) for b in range(0, len(order), batch_size)]
    assert padding_fraction(bucketed) < padding_fraction(shuffled) / 2


def test_length_buckets_are_seeded(mixed_dataset):
    ds, _ = mixed_dataset
    a, b = LengthBuckets(ds, 8, seed=5), LengthBuckets(ds, 8, seed=5)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))


# ---------------------------------------------------------------- TextDataModule


def test_datamodule_from_texts(zh_docs):
    dm = TextDataModule(texts=[*zh_docs, "   "], val_split=0, max_length=64, batch_size=2)
    assert dm.vocab_size == len(dm.tokenizer) == len(CharTokenizer().build_vocab(zh_docs))
    assert sorted(docs_in(dm.train_dataset, dm.tokenizer)) == sorted(zh_docs)
    assert dm.val_dataset is None
    assert list(dm.val_dataloader()) == []


def test_datamodule_texts_as_one_string_raises(zh_docs):
    # a str is a sequence of characters: each would silently become a one-character document
    with pytest.raises(ValueError, match="texts must be a list of documents"):
        TextDataModule(texts="\n\n".join(zh_docs))
    with pytest.raises(ValueError, match="not one string"):
        TextDataset("床前明月光", CharTokenizer().build_vocab(["床前明月光"]), max_length=8)


def test_datamodule_texts_and_train_path_together_raise(zh_corpus_file, zh_docs):
    with pytest.raises(ValueError, match="not both"):
        TextDataModule(train_path=str(zh_corpus_file), texts=zh_docs)
    with pytest.raises(ValueError, match="non-empty"):
        TextDataModule(texts=["", " \n"])


def test_datamodule_from_file_and_directory(tmp_path, zh_corpus_file, zh_docs):
    from_file = TextDataModule(train_path=str(zh_corpus_file), val_split=0, max_length=64)
    assert sorted(docs_in(from_file.train_dataset, from_file.tokenizer)) == sorted(zh_docs)
    sub = tmp_path / "nested" / "deeper"
    sub.mkdir(parents=True)
    (sub / "more.jsonl").write_text(json.dumps({"text": "「新」的一行"}, ensure_ascii=False) + "\n", encoding="utf-8")
    from_dir = TextDataModule(train_path=str(tmp_path), val_split=0, max_length=64)
    assert sorted(docs_in(from_dir.train_dataset, from_dir.tokenizer)) == sorted([*zh_docs, "「新」的一行"])
    from_list = TextDataModule(train_path=[str(zh_corpus_file), str(sub)], val_split=0, max_length=64)
    assert from_list.tokenizer == from_dir.tokenizer


def test_val_split_is_held_out_and_seeded():
    docs = many_docs(40)
    split = TextDataModule(texts=docs, val_split=0.25, seed=7, max_length=64)
    again = TextDataModule(texts=docs, val_split=0.25, seed=7, max_length=64)
    other = TextDataModule(texts=docs, val_split=0.25, seed=8, max_length=64)
    train, val = docs_in(split.train_dataset, split.tokenizer), docs_in(split.val_dataset, split.tokenizer)
    assert len(val) == 10 and len(train) == 30
    assert set(train) <= set(docs)
    held_out = [d for d in docs if d not in set(train)]
    assert len(held_out) == 10
    assert sorted(val) == sorted(as_seen(d, split.tokenizer) for d in held_out)
    assert docs_in(again.val_dataset, again.tokenizer) == val
    assert sorted(docs_in(other.val_dataset, other.tokenizer)) != sorted(val)


def test_val_path_is_used_instead_of_a_split(zh_corpus_file, tmp_path, zh_docs):
    val_file = tmp_path / "val.txt"
    val_file.write_text("床前明月光。", encoding="utf-8")
    dm = TextDataModule(train_path=str(zh_corpus_file), val_path=str(val_file), val_split=0.5, max_length=64)
    assert sorted(docs_in(dm.train_dataset, dm.tokenizer)) == sorted(zh_docs)
    assert docs_in(dm.val_dataset, dm.tokenizer) == ["床前明月光。"]


@pytest.mark.parametrize(("n_docs", "val_split"), [(5, 0.05), (1, 0.4), (3, 0.9)])
def test_val_split_leaving_no_document_raises(n_docs, val_split):
    with pytest.raises(ValueError, match="val_split") as err:
        TextDataModule(texts=many_docs(n_docs), val_split=val_split)
    assert "document" in str(err.value)


@pytest.mark.parametrize("val_split", [-0.1, 1.0])
def test_val_split_out_of_range_raises(val_split):
    with pytest.raises(ValueError, match="val_split"):
        TextDataModule(texts=many_docs(10), val_split=val_split)


def test_vocab_is_built_from_the_training_split_only():
    docs = many_docs(30)
    dm = TextDataModule(texts=docs, val_split=0.3, seed=1, max_length=64)
    train = set(docs_in(dm.train_dataset, dm.tokenizer))
    held_out = [d for d in docs if d not in train]
    assert len(held_out) == 9
    for doc in docs:
        own = doc[0]  # the one character no other document holds
        assert (own in dm.tokenizer.token_to_id) == (doc in train)
    assert dm.tokenizer == CharTokenizer().build_vocab(d for d in docs if d in train)
    # a held-out document's own character becomes <unk> in the validation data
    val_tokens = [t for x, _ in items(dm.val_dataset) for t in x]
    unknown = sum(c not in dm.tokenizer.token_to_id for d in held_out for c in d)
    assert unknown >= len(held_out)
    assert val_tokens.count(dm.tokenizer.unk_token_id) == unknown


def test_vocab_size_and_min_freq_reach_the_tokenizer(zh_docs):
    dm = TextDataModule(texts=zh_docs, val_split=0, vocab_size=12)
    assert dm.vocab_size == len(dm.tokenizer) == 12
    dm = TextDataModule(texts=zh_docs, val_split=0, min_freq=3)
    counts = Counter("".join(zh_docs))
    assert set(dm.tokenizer.id_to_token[4:]) == {c for c, n in counts.items() if n >= 3}


def test_train_dataloader_yields_padded_dict_batches(zh_docs):
    dm = TextDataModule(texts=zh_docs, val_split=0, max_length=8, batch_size=3)
    n_tokens = 0
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        shapes = {v.shape for v in batch.values()}
        assert len(shapes) == 1
        rows, width = shapes.pop()
        assert 1 <= rows <= 3 and width <= 8
        assert all(v.dtype == torch.long for v in batch.values())
        assert batch["attention_mask"][:, 0].eq(1).all()
        assert torch.equal(batch["labels"].eq(IGNORE_INDEX), batch["attention_mask"].eq(0))
        n_tokens += int(batch["attention_mask"].sum())
    assert n_tokens == sum(len(d) + 1 for d in zh_docs)


def test_bucket_by_length_dataloader():
    docs = many_docs(120)
    plain = TextDataModule(texts=docs, val_split=0.1, max_length=32, batch_size=8)
    bucketed = TextDataModule(texts=docs, val_split=0.1, max_length=32, batch_size=8, bucket_by_length=True)
    train = list(bucketed.train_dataloader())
    assert all(set(b) == {"input_ids", "labels", "attention_mask"} and b["input_ids"].shape[0] <= 8 for b in train)
    assert sum(int(b["attention_mask"].sum()) for b in train) == int(bucketed.train_dataset.lengths().sum())
    torch.manual_seed(0)
    assert padding_fraction(train) < padding_fraction(list(plain.train_dataloader()))
    val = list(bucketed.val_dataloader())
    assert sum(int(b["attention_mask"].sum()) for b in val) == int(bucketed.val_dataset.lengths().sum())


def test_packing_dataloader(zh_docs):
    dm = TextDataModule(texts=zh_docs, val_split=0, max_length=10, batch_size=4, packing=True)
    batches = list(dm.train_dataloader())
    assert all(b["input_ids"].shape[1] == 10 for b in batches)
    mask = torch.cat([b["attention_mask"] for b in batches])
    assert int((mask.sum(1) < 10).sum()) <= 1  # only the last window may be short
    assert int(mask.sum()) == sum(len(d) + 2 for d in zh_docs) - 1


def test_bucket_by_length_and_packing_together_raise(zh_docs):
    with pytest.raises(ValueError, match=r"bucket_by_length.*--data.bucket_by_length false --data.packing true"):
        TextDataModule(texts=zh_docs, val_split=0, bucket_by_length=True, packing=True)


def test_min_freq_that_leaves_no_character_raises(zh_docs):
    with pytest.raises(ValueError, match=r"data.min_freq=1000 leaves no character in the vocabulary"):
        TextDataModule(texts=zh_docs, val_split=0, min_freq=1000)


def test_cache_dir_that_is_a_file_raises(zh_docs, tmp_path):
    file = tmp_path / "cache"
    file.write_text("not a folder", encoding="utf-8")
    with pytest.raises(ValueError, match=f"data.cache_dir={file} is a file"):
        TextDataModule(texts=zh_docs, val_split=0, cache_dir=str(file))
    assert file.read_text(encoding="utf-8") == "not a folder"


def test_a_file_of_one_paragraph_is_told_about_the_separator(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_text("\n".join(f"第{i}行。" for i in range(50)), encoding="utf-8")  # one paragraph per line
    with pytest.raises(ValueError, match=r"of 1 document\(s\).*--data.separator '\\n'"):
        TextDataModule(train_path=str(path))
    assert len(TextDataModule(train_path=str(path), separator="\\n").val_dataset.corpus) == 2  # 5% of 50 lines


def test_fit_validate_and_test_warn_when_much_of_the_text_is_unk(zh_docs, tmp_path):
    path = tmp_path / "tokenizer.json"
    TextDataModule(texts=zh_docs[:3], val_split=0).tokenizer.save(path)  # 34% of zh_docs' characters lack
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(zh_docs[1:]), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"\d+\.\d% of the training characters .* are read as <unk>: .*tokenizer_path"):
        TextDataModule(texts=zh_docs, val_split=0, tokenizer_path=str(path)).setup("fit")
    with pytest.warns(UserWarning, match=r"are read as <unk>: data.min_freq=2 .* Lower data.min_freq"):
        TextDataModule(texts=zh_docs + zh_docs[:3], val_split=0, min_freq=2).setup("fit")  # 19.5%
    # a checkpoint's vocabulary on other text: its loss says little of that text
    with pytest.warns(UserWarning, match=r"of the validation characters .* says little of this text. The model never"):
        TextDataModule(val_path=str(other), tokenizer_path=str(path)).setup("validate")
    with pytest.warns(UserWarning, match=r"of the test characters .* The loss counts each as the one token <unk>"):
        TextDataModule(test_path=str(other), tokenizer_path=str(path)).setup("test")
    # no setting dropped them: they only occur in the validation text
    with pytest.warns(UserWarning, match=r"validation characters .* <unk>: they do not occur in the training text"):
        TextDataModule(texts=zh_docs[:1], val_path=str(other)).setup("validate")
    english = tmp_path / "english.txt"
    english.write_text("Spring sleep, unaware of dawn.\n\nBirds sing everywhere.", encoding="utf-8")
    # training text that would be mostly <unk> (English with a Chinese vocabulary) is refused
    with pytest.raises(ValueError, match=r"100.0% of the training characters .* \(Refused: over 50% is a run that"):
        TextDataModule(train_path=str(english), val_split=0, tokenizer_path=str(path)).setup("fit")
    # and fit, before it picks best.ckpt by that loss (English validation text for a Chinese vocabulary, say)
    with pytest.warns(UserWarning, match=r"100.0% of the validation characters .* do not occur in the training text"):
        TextDataModule(texts=zh_docs, val_path=str(english)).setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextDataModule(texts=zh_docs, val_split=0).setup("fit")  # every character known: no warning
        mostly_known = tmp_path / "mostly_known.txt"  # a few rare characters (under 20%): the usual, no warning
        mostly_known.write_text(zh_docs[0] + "鑫", encoding="utf-8")
        TextDataModule(texts=zh_docs, val_path=str(mostly_known)).setup("fit")
        TextDataModule(texts=zh_docs, val_path=str(mostly_known)).setup("validate")  # (validate --ckpt_path best)
        TextDataModule(texts=zh_docs, val_split=0, test_path=str(mostly_known)).setup("test")
        TextDataModule(test_path=str(other), texts=zh_docs, val_split=0).setup("test")
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("春眠\nX", encoding="utf-8")
        TextDataModule(predict_path=str(prompts), tokenizer_path=str(path)).setup("predict")  # prompts: not text


def test_tokenizer_path_that_is_a_folder_names_the_file_to_give(zh_docs, tmp_path):
    run_logs = tmp_path / "logs" / "version_0"
    run_logs.mkdir(parents=True)
    TextDataModule(texts=zh_docs, val_split=0).tokenizer.save(run_logs / "tokenizer.json")
    with pytest.raises(ValueError, match=r"is a folder; give the tokenizer.json .*version_0/tokenizer.json"):
        TextDataModule(texts=zh_docs, val_split=0, tokenizer_path=str(tmp_path / "logs"))


def test_prompts_are_the_lines_of_text_files_and_the_texts_of_jsonl_ones(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.txt").write_text("春眠\n\n  床前明月  \r\n", encoding="utf-8")
    (tmp_path / "p" / "b.jsonl").write_text('{"text": "举头"}\n\n{"text": "两行\\n提示"}\n', encoding="utf-8")
    assert read_prompts(tmp_path / "p") == ["春眠", "床前明月", "举头", "两行\n提示"]
    assert read_prompts([tmp_path / "p" / "b.jsonl", tmp_path / "p" / "a.txt"]) == [
        "举头",
        "两行\n提示",
        "春眠",
        "床前明月",
    ]


def test_state_dict_round_trip_and_refusal(zh_docs, tmp_path):
    dm = TextDataModule(texts=zh_docs, val_split=0)
    state = dm.state_dict()
    json.dumps(state)  # checkpoint-friendly: plain JSON types
    same = TextDataModule(texts=list(reversed(zh_docs)), val_split=0)
    same.load_state_dict(state)
    assert same.tokenizer == dm.tokenizer

    different = TextDataModule(texts=[*zh_docs, "新字"], val_split=0)
    before = different.tokenizer.id_to_token
    with pytest.raises(ValueError, match="vocabulary") as err:
        different.load_state_dict(state)
    assert str(dm.vocab_size) in str(err.value) and str(different.vocab_size) in str(err.value)
    assert "tokenizer_path" in str(err.value)
    assert different.tokenizer.id_to_token == before


def test_tokenizer_path_uses_the_saved_vocabulary(zh_docs, tmp_path):
    first = TextDataModule(texts=zh_docs[:3], val_split=0)
    path = tmp_path / "tokenizer.json"
    first.tokenizer.save(path)
    new_text = "新的文字不在词表里"
    dm = TextDataModule(texts=[*zh_docs, new_text], val_split=0, tokenizer_path=str(path), max_length=64)
    assert dm.tokenizer == first.tokenizer
    assert dm.vocab_size == first.vocab_size
    dm.load_state_dict(first.state_dict())  # resuming with other data works through tokenizer_path
    assert first.tokenizer.unknown_chars(new_text)
    unknown = sum(c not in first.tokenizer.token_to_id for d in [*zh_docs, new_text] for c in d)
    encoded = [t for x, _ in items(dm.train_dataset) for t in x]
    assert encoded.count(dm.tokenizer.unk_token_id) == unknown
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        TextDataModule(texts=zh_docs, val_split=0, tokenizer_path=str(tmp_path / "missing.json"))
    # with a saved vocabulary the training text is read when a stage needs it, not for test or predict
    moved = tmp_path / "moved.txt"
    test_file = tmp_path / "test.txt"
    test_file.write_text("\n\n".join(zh_docs), encoding="utf-8")
    later = TextDataModule(train_path=str(moved), tokenizer_path=str(path), test_path=str(test_file), max_length=64)
    later.setup("test")
    assert sum(len(b["input_ids"]) for b in later.test_dataloader()) == len(zh_docs)
    for stage in ("fit", "validate"):
        with pytest.raises(FileNotFoundError, match=r"moved\.txt does not exist"):
            later.setup(stage)


def test_cache_dir_reuses_the_encoded_corpus(zh_docs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    docs = [*zh_docs, *many_docs(20)]
    kwargs = dict(texts=docs, val_split=0.2, max_length=16, batch_size=4, cache_dir=str(cache))
    first = TextDataModule(**kwargs)
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".tokens.npy")]) == 2  # train and val
    assert len([f for f in files if f.endswith(".offsets.npy")]) == 2
    assert all(f.endswith(".npy") and ".tmp" not in f for f in files)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}

    def no_encoding(*args, **kwargs):
        raise AssertionError("the corpus was encoded again instead of read from the cache")

    monkeypatch.setattr(data_mod.EncodedCorpus, "encode", classmethod(no_encoding))
    second = TextDataModule(**kwargs)
    monkeypatch.undo()
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert isinstance(second.train_dataset.corpus.tokens, np.memmap)
    assert items(second.train_dataset) == items(first.train_dataset)
    assert items(second.val_dataset) == items(first.val_dataset)
    torch.manual_seed(0)
    a = list(first.train_dataloader())
    torch.manual_seed(0)
    b = list(second.train_dataloader())
    assert len(a) == len(b)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    uncached = TextDataModule(**{**kwargs, "cache_dir": None})
    assert items(uncached.train_dataset) == items(first.train_dataset)


def test_cache_dir_is_keyed_by_text_and_vocabulary(zh_docs, tmp_path):
    cache = tmp_path / "cache"
    a = TextDataModule(texts=zh_docs, val_split=0, max_length=64, cache_dir=str(cache))
    n_files = len(list(cache.iterdir()))
    reordered = [zh_docs[-1], *zh_docs[:-1]]  # the same vocabulary, other text
    b = TextDataModule(texts=reordered, val_split=0, max_length=64, cache_dir=str(cache))
    assert b.tokenizer == a.tokenizer
    assert len(list(cache.iterdir())) == 2 * n_files
    assert docs_in(b.train_dataset, b.tokenizer) == reordered
    grown = [*zh_docs[:-1], zh_docs[-1] + "改"]  # other text, other vocabulary
    c = TextDataModule(texts=grown, val_split=0, max_length=64, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 3 * n_files
    assert docs_in(c.train_dataset, c.tokenizer) == grown
    assert docs_in(a.train_dataset, a.tokenizer) == zh_docs


def test_cache_key_tells_apart_documents_split_differently(tmp_path):
    # the same characters, cut into other documents: the cached offsets of one must not serve the other
    cache = tmp_path / "cache"
    a = TextDataModule(texts=["a\0b", "\0"], val_split=0, max_length=8, cache_dir=str(cache), min_freq=1)
    b = TextDataModule(texts=["a", "b\0\0"], val_split=0, max_length=8, cache_dir=str(cache), min_freq=1)
    assert a.tokenizer == b.tokenizer
    assert docs_in(b.train_dataset, b.tokenizer) == ["a", "b\0\0"]
    assert docs_in(a.train_dataset, a.tokenizer) == ["a\0b", "\0"]


def test_bundled_sample_corpus_is_the_default():
    assert SAMPLE_CORPUS.name == "tang300.txt" and SAMPLE_CORPUS.parent.name == "corpora"
    assert SAMPLE_CORPUS.is_file()
    poems = load_corpus(SAMPLE_CORPUS)
    assert len(poems) >= 100
    longest = max(len(p) for p in poems)
    dm = TextDataModule(max_length=longest + 1, val_split=0.05)
    train, val = docs_in(dm.train_dataset, dm.tokenizer), docs_in(dm.val_dataset, dm.tokenizer)
    held_out = Counter(poems) - Counter(train)
    assert sum(held_out.values()) == len(val) == round(len(poems) * 0.05)
    assert Counter(val) == Counter(as_seen(p, dm.tokenizer) for p in held_out.elements())
    assert dm.tokenizer == CharTokenizer().build_vocab(train)


@pytest.mark.parametrize("items", [1, 7, 16, 23])
@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_epoch_sampler_deals_out_the_rest_of_an_epoch_over_any_number_of_ranks(items, ranks):
    # from the epoch's start: what torch's DistributedSampler deals out, padding included
    for shuffle in (True, False):
        for rank in range(ranks):
            plain = torch.utils.data.DistributedSampler(range(items), ranks, rank, shuffle=shuffle, seed=3)
            assert list(EpochSampler(range(items), ranks, rank, shuffle=shuffle, seed=3)) == list(plain)
    # resumed after two rounds of 2 ranks: every item not yet seen once over the ranks, the seen ones only as
    # the padding that gives every rank as many
    order = list(EpochSampler(range(items), 1, 0, shuffle=True, seed=3))
    seen = min(4, items - 1)
    dealt = []
    for rank in range(ranks):
        sampler = EpochSampler(range(items), ranks, rank, shuffle=True, seed=3)
        sampler.resume_epoch, sampler.seen = 0, seen
        dealt.append(list(sampler))
    assert len({len(d) for d in dealt}) == 1
    flat = [dealt[i % ranks][i // ranks] for i in range(len(dealt[0]) * ranks)]  # rank 0's first, rank 1's, ...
    rest = order[seen:]
    assert flat[: len(rest)] == rest  # every unseen item once, in the epoch's order
    assert flat[len(rest) :] == (order * ranks)[: len(flat) - len(rest)] and len(flat) - len(rest) < ranks
    # an epoch that ends before the data does (limit_train_batches, or one resumed from another batch layout)
    ends = []
    for rank in range(ranks):
        sampler = EpochSampler(range(items), ranks, rank, shuffle=True, seed=3)
        sampler.resume_epoch, sampler.seen, sampler.end = 0, 0, items - 1
        ends.append(list(sampler))
    assert [ends[i % ranks][i // ranks] for i in range(items - 1)] == order[: items - 1]
    assert len(ends[0]) == math.ceil((items - 1) / ranks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": [b"\xe6\x98\xa5", "天"]}, r"texts must be a list of str documents; it holds a bytes \(decode"),
        ({"texts": [1, 2]}, "texts must be a list of str documents; it holds a int"),
        ({"max_length": "128"}, "data.max_length='128' must be a whole number"),
        ({"max_length": 64.5}, "data.max_length=64.5 must be a whole number"),
        ({"batch_size": None}, "data.batch_size=None must be a whole number"),
        ({"batch_size": 2.5}, "data.batch_size=2.5 must be a whole number"),
        ({"seed": "a"}, "data.seed='a' must be a whole number"),
        ({"num_workers": -1}, r"data.num_workers=-1 must be 0 \(load in the main process\) or more"),
    ],
)
def test_python_arguments_of_the_wrong_kind_are_named(zh_docs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**{"texts": zh_docs, **kwargs})


def test_numpy_integers_are_whole_numbers(zh_docs):
    data = TextDataModule(texts=zh_docs, max_length=np.int64(32), batch_size=np.int32(2), val_split=0)
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == 2


def test_a_file_named_twice_is_read_once_and_said(zh_corpus_file):
    with pytest.warns(UserWarning, match=r"data paths name .*corpus.txt more than once; each file is read once"):
        twice = TextDataModule(train_path=[str(zh_corpus_file), str(zh_corpus_file.parent)], val_split=0)
    once = TextDataModule(train_path=str(zh_corpus_file), val_split=0)
    assert len(twice.train_dataset.corpus) == len(once.train_dataset.corpus)
    assert find_text_files([zh_corpus_file, zh_corpus_file.parent]) == [zh_corpus_file]  # as first named


def test_validation_files_that_are_also_trained_on_are_warned_of(zh_corpus_file):
    with pytest.warns(UserWarning, match=r"data.val_path and data.train_path both hold .*corpus.txt: the model trains"):
        TextDataModule(train_path=str(zh_corpus_file.parent), val_path=str(zh_corpus_file))


@pytest.mark.parametrize("bucket_by_length", [True, False])
def test_batches_per_epoch_is_each_process_s_loader_length(zh_docs, bucket_by_length):
    from types import SimpleNamespace

    dm = TextDataModule(texts=zh_docs * 7, val_split=0, max_length=16, batch_size=3, bucket_by_length=bucket_by_length)
    for world_size in (1, 2, 3, 5):
        lengths = set()
        for rank in range(world_size):
            dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=0)
            lengths.add(len(dm._loader(dm.train_dataset, shuffle=True)))
        assert lengths == {dm.batches_per_epoch(world_size)}, world_size
