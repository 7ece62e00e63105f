"""CharTokenizer: special tokens, vocabulary building, encode/decode round trips, save/load."""

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_lightning.tokenizer import SPECIAL_TOKENS, CharTokenizer, SimpleTokenizer

PROPERTY = settings(max_examples=60, deadline=None)

# Everything a Chinese corpus is made of: CJK, full-width punctuation, ASCII, whitespace, and code points
# outside the Basic Multilingual Plane (a CJK Extension B ideograph and emoji, two UTF-16 units each).
ALPHABET = "春眠不觉晓处闻啼鸟，。！？「」：；、（）《》abcXYZ019 \n\t.,'\"\\𠀀😀🀄"
texts_over_alphabet = st.text(alphabet=ALPHABET, max_size=60)


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer().build_vocab([ALPHABET])


def test_special_tokens_come_first_with_pad_zero():
    t = CharTokenizer()
    assert t.pad_token_id == 0
    assert t.id_to_token[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    for name in ("pad", "unk", "bos", "eos"):
        token, token_id = getattr(t, f"{name}_token"), getattr(t, f"{name}_token_id")
        assert token == f"<{name}>"
        assert t.token_to_id[token] == token_id
        assert t.id_to_token[token_id] == token
    ids = {t.pad_token_id, t.unk_token_id, t.bos_token_id, t.eos_token_id}
    assert ids == set(range(len(SPECIAL_TOKENS)))
    assert len(t) == t.vocab_size == len(SPECIAL_TOKENS)


def test_special_token_text_is_not_parsed_as_a_special_token():
    t = CharTokenizer().build_vocab(["<pad><eos>"])
    ids = t.encode("<pad>")
    assert len(ids) == 5
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert t.decode(ids) == "<pad>"


def test_simple_tokenizer_is_char_tokenizer():
    assert SimpleTokenizer is CharTokenizer


def test_build_vocab_orders_by_frequency_then_code_point():
    t = CharTokenizer().build_vocab(["明明明月月光", "光光床"])
    # 明 3, 光 3 (a tie: 光 U+5149 before 明 U+660E), 月 2, 床 1
    assert ord("光") < ord("明")
    assert t.id_to_token[4:] == ["光", "明", "月", "床"]


@PROPERTY
@given(st.lists(st.text(max_size=30), max_size=8))
def test_build_vocab_is_most_frequent_first_with_no_limit(texts):
    t = CharTokenizer().build_vocab(texts)
    counts = Counter("".join(texts))
    chars = t.id_to_token[len(SPECIAL_TOKENS) :]
    assert set(chars) == set(counts)
    keys = [(-counts[c], c) for c in chars]
    assert keys == sorted(keys)
    assert len(t) == t.vocab_size == len(SPECIAL_TOKENS) + len(counts)


@PROPERTY
@given(st.lists(st.text(alphabet="天地玄黄宇宙洪荒日月盈昃abc", max_size=40), max_size=6), st.integers(5, 20))
def test_build_vocab_cap_keeps_the_most_frequent(texts, cap):
    t = CharTokenizer(vocab_size=cap).build_vocab(texts)
    counts = Counter("".join(texts))
    assert len(t) == min(cap, len(SPECIAL_TOKENS) + len(counts))
    kept = set(t.id_to_token[len(SPECIAL_TOKENS) :])
    dropped = set(counts) - kept
    if kept and dropped:
        assert min(counts[c] for c in kept) >= max(counts[c] for c in dropped)


def test_build_vocab_cap_counts_special_tokens():
    t = CharTokenizer(vocab_size=6).build_vocab(["一一一一二二二三三四"])
    assert len(t) == 6
    assert t.id_to_token[4:] == ["一", "二"]
    assert t.encode("三四") == [t.unk_token_id, t.unk_token_id]


@PROPERTY
@given(st.lists(st.text(alphabet="甲乙丙丁戊己庚辛", max_size=30), max_size=6), st.integers(1, 6))
def test_min_freq_drops_rare_characters(texts, min_freq):
    counts = Counter("".join(texts))
    expected = {c for c, n in counts.items() if n >= min_freq}
    from_init = CharTokenizer(min_freq=min_freq).build_vocab(texts)
    from_call = CharTokenizer().build_vocab(texts, min_freq=min_freq)
    assert set(from_init.id_to_token[4:]) == expected
    assert from_call == from_init


@PROPERTY
@given(st.lists(st.text(max_size=20), max_size=10), st.randoms(use_true_random=False))
def test_vocab_does_not_depend_on_text_order(texts, rnd):
    shuffled = list(texts)
    rnd.shuffle(shuffled)
    a = CharTokenizer().build_vocab(texts)
    b = CharTokenizer().build_vocab(shuffled)
    c = CharTokenizer().build_vocab(["".join(shuffled)])
    assert a.id_to_token == b.id_to_token == c.id_to_token


def test_build_vocab_accepts_a_generator_and_replaces_the_old_vocab():
    t = CharTokenizer().build_vocab(["旧"])
    t.build_vocab(s for s in ["新", "新"])
    assert t.id_to_token == [*SPECIAL_TOKENS, "新"]


def test_unknown_characters_map_to_unk():
    t = CharTokenizer().build_vocab(["你好"])
    ids = t.encode("你们好")
    assert ids == [t.token_to_id["你"], t.unk_token_id, t.token_to_id["好"]]
    assert t.unknown_chars("你们好吗") == {"们", "吗"}
    assert t.decode(ids, skip_special_tokens=False) == "你<unk>好"


@pytest.mark.parametrize(
    "text",
    [
        "春眠不觉晓，\n处处闻啼鸟。\n",
        "  两个空格  \t制表\n\n空行",
        "「你好！」他问：「晓？」",
        "𠀀字在基本平面之外",
        "😀🀄 emoji 😀",
        "",
    ],
)
def test_round_trip_of_characters_in_the_vocabulary(text):
    t = CharTokenizer().build_vocab([text])
    ids = t.encode(text)
    assert len(ids) == len(text)  # one id per code point, also outside the BMP
    assert t.unk_token_id not in ids
    assert t.decode(ids) == text


@PROPERTY
@given(texts_over_alphabet)
def test_round_trip_over_the_vocabulary_alphabet(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=True)) == text


@PROPERTY
@given(st.text(max_size=60))
def test_encode_ids_in_range_and_unk_exactly_for_unknown_chars(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    for c, i in zip(text, ids, strict=True):
        if c in ALPHABET:
            assert tok.id_to_token[i] == c
        else:
            assert i == tok.unk_token_id


@PROPERTY
@given(texts_over_alphabet, st.integers(0, 70))
def test_encode_max_length_and_special_tokens(tok, text, max_length):
    plain = tok.encode(text)
    special = tok.encode(text, add_special_tokens=True)
    assert special == [tok.bos_token_id, *plain, tok.eos_token_id]
    assert tok.encode(text, max_length=max_length) == plain[:max_length]
    cut = tok.encode(text, max_length=max_length, add_special_tokens=True)
    assert cut == special[:max_length]
    assert len(cut) == min(max_length, len(text) + 2)


def test_decode_skip_special_tokens(tok):
    a, b = tok.token_to_id["春"], tok.token_to_id["眠"]
    ids = [tok.bos_token_id, a, tok.pad_token_id, b, tok.unk_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "春眠"
    assert tok.decode(ids, skip_special_tokens=True) == "春眠"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>春<pad>眠<unk><eos><pad>"


def test_decode_can_show_unk_instead_of_dropping_it(tok):
    a = tok.token_to_id["春"]
    ids = [tok.bos_token_id, a, tok.unk_token_id, a, tok.vocab_size + 5, tok.eos_token_id]
    assert tok.decode(ids, unk="\ufffd") == "春\ufffd春\ufffd"
    assert tok.decode(ids, skip_special_tokens=False, unk="?") == "<bos>春?春?<eos>"
    assert tok.decode(ids) == "春春<unk>"  # without unk: <unk> is dropped, an id outside the vocabulary shown


def test_decode_accepts_tensor_like_ids(tok):
    import torch

    ids = tok.encode("「你好」", add_special_tokens=True)
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_save_load_round_trip(tmp_path):
    t = CharTokenizer(vocab_size=40, min_freq=2).build_vocab([ALPHABET * 3, "\u2028\u2028"])
    path = tmp_path / "tokenizer.json"
    t.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded == t
    assert loaded.id_to_token == t.id_to_token
    assert loaded.token_to_id == t.token_to_id
    assert (loaded.max_vocab_size, loaded.min_freq) == (40, 2)
    assert loaded.encode(ALPHABET) == t.encode(ALPHABET)
    assert CharTokenizer.load(str(path)) == t  # str paths too


@PROPERTY
@given(st.text(max_size=80))
def test_save_load_round_trip_any_characters(text):
    t = CharTokenizer().build_vocab([text])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        t.save(path)
        assert CharTokenizer.load(path).id_to_token == t.id_to_token
        with path.open(encoding="utf-8") as f:
            assert json.load(f)["vocab"] == t.id_to_token


def test_saved_file_is_readable_utf8_json(tmp_path):
    t = CharTokenizer().build_vocab(["床前明月光，疑是地上霜。𠀀"])
    path = tmp_path / "tokenizer.json"
    t.save(path)
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # strict: must be valid UTF-8
    with path.open(encoding="utf-8") as f:
        state = json.load(f)
    assert state["vocab"] == t.id_to_token
    for c in "床前明月光，疑是地上霜。𠀀":
        assert c in text, f"{c!r} is not written literally"
    assert "\\u" not in text
    lines = [line.strip().rstrip(",") for line in text.splitlines()]
    assert all(json.dumps(token, ensure_ascii=False) in lines for token in t.id_to_token)  # one token per line


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_dir" / "tokenizer.json"
    with pytest.raises(FileNotFoundError) as err:
        CharTokenizer.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content",
    [b"this is not json", b'{"vocab": [', "\u4e2d\u6587".encode("gbk"), b'{"format": "something else"}', b"[1, 2]"],
    ids=["text", "truncated", "gbk-bytes", "no-vocab", "list"],
)
def test_load_of_a_non_tokenizer_file_names_the_path(tmp_path, content):
    path = tmp_path / "weird.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        CharTokenizer.load(path)
    assert str(path) in str(err.value)


def test_load_of_a_transformers_tokenizer_says_which_file_to_use(tmp_path):
    path = tmp_path / "tokenizer.json"  # what export writes: the tokenizers library's format
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"is a transformers \(tokenizers\) file.*logs/version_N/tokenizer.json"):
        CharTokenizer.load(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"version": 2}, "vocabulary of version 2, which a newer qwen3_lightning wrote; .*upgrade the package"),
        # a later version may lay the vocabulary out otherwise: still told to upgrade
        ({"version": 2, "vocab": {"a": 4}}, "vocabulary of version 2, which a newer qwen3_lightning wrote"),
        ({"format": "another.Tokenizer"}, r"format 'another.Tokenizer', not a CharTokenizer's"),
        ({"version": "1.0"}, "version='1.0'; a CharTokenizer's version is a whole number >= 1"),
        ({"version": True}, "version=True"),
        ({"version": 0}, "version=0"),
    ],
    ids=["newer", "newer-layout", "other", "str", "bool", "zero"],
)
def test_load_refuses_a_format_or_version_it_does_not_know(tmp_path, header, message):
    path = tmp_path / "tokenizer.json"
    state = {**CharTokenizer().build_vocab(["ab"]).to_dict(), **header}
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        CharTokenizer.load(path)
    assert str(path) in str(err.value)


def test_a_state_without_format_or_version_reads_as_version_1():
    assert CharTokenizer.from_dict({"vocab": [*SPECIAL_TOKENS, "a"]}).id_to_token == [*SPECIAL_TOKENS, "a"]


def test_load_refuses_a_vocabulary_without_the_specials_first(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"vocab": ["a", "<pad>", "<unk>", "<bos>", "<eos>"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        CharTokenizer.load(path)
    path.write_text(json.dumps({"vocab": [*SPECIAL_TOKENS, "a", "a"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer.load(path)


@pytest.mark.parametrize("vocab_size", [-1, 0, 1, 3, 4])
def test_vocab_size_without_room_for_characters_raises(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        CharTokenizer(vocab_size=vocab_size)


def test_smallest_useful_vocab_size_and_min_freq_check():
    assert len(CharTokenizer(vocab_size=5).build_vocab(["甲乙乙"])) == 5
    with pytest.raises(ValueError, match="min_freq"):
        CharTokenizer(min_freq=0)


@PROPERTY
@given(st.lists(st.text(max_size=30), max_size=5), st.one_of(st.none(), st.integers(5, 30)))
def test_len_equals_vocab_size(texts, cap):
    t = CharTokenizer(vocab_size=cap).build_vocab(texts)
    assert len(t) == t.vocab_size == len(t.id_to_token) == len(t.token_to_id)
    assert sorted(t.token_to_id.values()) == list(range(len(t)))
    if cap is not None:
        assert len(t) <= cap


def test_equality_is_by_vocabulary():
    a = CharTokenizer().build_vocab(["天地"])
    assert a == CharTokenizer().build_vocab(["地天"])
    assert a != CharTokenizer().build_vocab(["天地人"])
    assert a != ["<pad>", "<unk>", "<bos>", "<eos>", "地", "天"]
