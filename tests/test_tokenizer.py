"""QWenTokenizer: golden ids of the original, equality with plain tiktoken, and the transformers integration."""

import base64
import importlib.util
import json
import logging
import pickle
import random
import shutil
import unicodedata

import pytest
import tiktoken
import torch
from conftest import load_reference
from tiktoken.load import load_tiktoken_bpe

from qwen.tokenization_qwen import PAT_STR, QWenTokenizer, default_vocab_file

GOLDEN = load_reference("tokenizer_golden.json")
HUB_TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(vocab_file=default_vocab_file())


@pytest.fixture(scope="module")
def reference_encoding() -> tiktoken.Encoding:
    """A plain tiktoken Encoding over the same file, built with tiktoken's own loader."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    ranks = load_tiktoken_bpe(default_vocab_file())
    return tiktoken.Encoding(
        "qwen-reference",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={token: len(ranks) + i for i, token in enumerate(specials)},
    )


def mixed_text(n_bytes: int, seed: int) -> str:
    """Seeded random English / Chinese / code / whitespace / emoji / digits / special-token text."""
    rng = random.Random(seed)
    words = ["the", "Qwen", "model", "token", "it's", "we'll", "HELLO", "naïve", "café", "über", "x"]
    code = [
        "def f(x):\n",
        "    return x**2  # sq\n",
        "{'k': [1, 2]}",
        "if a<=b:",
        '\tprint("<|x|>")',
        "}\r\n",
    ]
    pieces = [
        lambda: " ".join(rng.choices(words, k=rng.randint(1, 8))),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 12))),
        lambda: "你好，世界！今天天气怎么样？",
        lambda: rng.choice(code),
        lambda: "".join(rng.choices([" ", "\t", "\n", "\r\n", "\u3000", "\xa0"], k=rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 3))),
        lambda: "👩\u200d💻🏳️\u200d🌈",
        lambda: str(rng.randint(0, 10**12)) + "." + str(rng.randint(0, 999)),
        lambda: "e\u0301 A\u030a n\u0303",  # combining sequences: NFC must fold them
        lambda: "日本語のテキスト。한국어 텍스트.",
        lambda: rng.choice(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_7|>", "<|im_", "|>"]),
    ]
    weights = [30, 15, 5, 10, 10, 5, 2, 5, 3, 4, 2]
    out, size = [], 0
    while size < n_bytes:
        piece = rng.choices(pieces, weights)[0]()
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


# ---- golden data of the original tokenizer ----


def test_golden_special_tokens(tok):
    meta = GOLDEN["meta"]
    assert len(tok) == meta["len"]
    for token, index in meta["special"].items():
        assert tok.convert_tokens_to_ids(token) == index
        assert tok.decode([index]) == token
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (
        meta["special"]["<|endoftext|>"],
        meta["special"]["<|im_start|>"],
        meta["special"]["<|im_end|>"],
    )
    extras = [tok.convert_tokens_to_ids(f"<|extra_{i}|>") for i in range(205)]
    assert extras == list(range(meta["special"]["<|extra_0|>"], meta["special"]["<|extra_204|>"] + 1))


@pytest.mark.parametrize("case", GOLDEN["encode"], ids=lambda c: repr(c["text"])[:30])
def test_golden_encode(tok, case):
    assert tok.encode(case["text"]) == case["ids_default"]
    assert tok.encode(case["text"], allowed_special=set()) == case["ids_no_special"]
    assert tok(case["text"])["input_ids"] == case["ids_default"]
    assert tok.convert_tokens_to_ids(tok.tokenize(case["text"])) == case["ids_default"]
    assert tok.decode(case["ids_default"]) == case["decoded_roundtrip"]
    assert tok.decode(case["ids_no_special"]) == case["decoded_roundtrip"]


@pytest.mark.parametrize("case", GOLDEN["decode"], ids=lambda c: str(c["ids"])[:30])
def test_golden_decode(tok, case):
    assert (
        tok.decode(case["ids"], skip_special_tokens=case.get("skip_special_tokens", False)) == case["decode"]
    )


# ---- equality with plain tiktoken over a large mixed corpus ----


def test_matches_plain_tiktoken_on_1mb_mixed_text(tok, reference_encoding):
    text = mixed_text(1 << 20, seed=1234)
    assert len(text.encode("utf-8")) >= 1 << 20
    nfc = unicodedata.normalize("NFC", text)
    assert nfc != text  # the corpus does exercise normalisation

    ids_default = tok.encode(text)
    assert ids_default == reference_encoding.encode(nfc, allowed_special="all")
    assert any(i >= tok.eod_id for i in ids_default)  # special-token text was parsed by default

    ids_plain = tok.encode(text, allowed_special=set())
    assert ids_plain == reference_encoding.encode(nfc, allowed_special=set(), disallowed_special=())
    assert all(i < tok.eod_id for i in ids_plain)

    assert tok.decode(ids_default) == nfc
    assert tok.decode(ids_plain) == nfc


def test_split_special_tokens_is_allowed_special_empty(tok):
    text = "say <|im_end|> and <|endoftext|>"
    plain = tok.encode(text, allowed_special=set())
    assert tok.encode(text, split_special_tokens=True) == plain
    assert tok(text, split_special_tokens=True)["input_ids"] == plain
    assert tok.encode(text, allowed_special={"<|im_end|>"}).count(tok.im_end_id) == 1
    assert tok.eod_id not in tok.encode(text, allowed_special={"<|im_end|>"})


def test_disallowed_special_raises(tok):
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode("x <|endoftext|>", allowed_special=set(), disallowed_special="all")


def test_decode_errors_is_per_call(tok):
    broken = [51461]  # " " + the first two bytes of a three-byte character
    assert tok.decode(broken) == " \ufffd"
    assert tok.decode(broken, errors="ignore") == " "
    with pytest.raises(UnicodeDecodeError):
        tok.decode(broken, errors="strict")


def test_unknown_ids_and_tokens_are_clear_errors(tok):
    with pytest.raises(ValueError, match="unknown token ids"):
        tok.decode([1, 10**7])
    with pytest.raises(ValueError, match="unknown token id"):
        tok.convert_ids_to_tokens(10**7)
    with pytest.raises(ValueError, match="unknown token"):
        tok.convert_tokens_to_ids("no-such-token")


def test_tokens_are_bytes_and_specials_are_str(tok):
    tokens = tok.tokenize("你好<|im_end|>")
    assert tokens == ["你好".encode(), "<|im_end|>"]
    assert tok.convert_tokens_to_string(tokens) == "你好<|im_end|>"


# ---- transformers integration ----


def test_pad_token_and_batch_padding(tok):
    tok = pickle.loads(pickle.dumps(tok))  # a private copy: the module fixture stays unpadded
    tok.pad_token = "<|extra_0|>"
    assert tok.pad_token_id == 151646
    texts = ["hello world, 你好", "hi"]
    lengths = [len(tok.encode(t)) for t in texts]
    for side in ("left", "right"):
        batch = tok(texts, padding=True, padding_side=side, return_tensors="pt")
        assert batch["input_ids"].shape == (2, max(lengths))
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        row = batch["input_ids"][1]
        pads = row == tok.pad_token_id
        assert pads.sum().item() == max(lengths) - lengths[1]
        expected = torch.tensor(tok.encode(texts[1]))
        kept = row[~pads]
        assert torch.equal(kept, expected)
        padded_at_start = bool(pads[0])
        assert padded_at_start == (side == "left")


def test_unknown_special_token_is_rejected(tok):
    with pytest.raises(ValueError, match="not a special token of the Qwen vocabulary"):
        QWenTokenizer(pad_token="<pad>")
    copy = pickle.loads(pickle.dumps(tok))
    with pytest.raises(ValueError, match="pad_token='<|extra_0|>'"):
        copy.pad_token = "[PAD]"
    with pytest.raises(ValueError, match="cannot grow"):
        copy.add_tokens(["brand-new-token"])


def test_pickle_roundtrip(tok):
    copy = QWenTokenizer(pad_token="<|extra_1|>")
    restored = pickle.loads(pickle.dumps(copy))
    text = "pickled 你好 <|im_start|>"
    assert restored.encode(text) == tok.encode(text)
    assert restored.decode(restored.encode(text)) == text
    assert restored.pad_token_id == 151647


def test_save_pretrained_roundtrip(tok, tmp_path):
    tok = pickle.loads(pickle.dumps(tok))
    tok.pad_token = "<|extra_0|>"
    files = tok.save_pretrained(tmp_path)
    assert str(tmp_path / "qwen.tiktoken") in files
    assert load_tiktoken_bpe(str(tmp_path / "qwen.tiktoken")) == tok.mergeable_ranks
    loaded = QWenTokenizer.from_pretrained(tmp_path)
    text = mixed_text(20_000, seed=7)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.pad_token_id == tok.pad_token_id


def test_extra_vocab_file(tmp_path, tok):
    token = "你好世界".encode()
    lines = [
        f"{base64.b64encode(token).decode()} 151851",  # new token, new id
        f"{base64.b64encode(b'hello').decode()} 151852",  # token already in the vocabulary: skipped
        f"{base64.b64encode(b'zzqq-new').decode()} 151645",  # id already taken by <|im_end|>: skipped
    ]
    extra = tmp_path / "extra.tiktoken"
    extra.write_text("\n".join(lines) + "\n")
    extended = QWenTokenizer(extra_vocab_file=str(extra))
    assert len(extended) == len(tok) + 1
    assert extended.encode("你好世界") == [151851]
    assert tok.encode("你好世界") != [151851]
    assert extended.decode([151851]) == "你好世界"
    assert extended.encode("hello") == tok.encode("hello")
    # the saved vocabulary carries the extra token, so the reloaded tokenizer needs no extra file
    extended.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "extra_vocab_file" not in config
    assert QWenTokenizer.from_pretrained(tmp_path / "saved").encode("你好世界") == [151851]


def test_malformed_vocab_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("IQ== 0\nnot-a-valid-line\n")
    with pytest.raises(ValueError, match="line 2: expected 'base64token rank'"):
        QWenTokenizer(vocab_file=str(bad))


def test_dashscope_fallback(tmp_path, caplog, tok):
    # a checkpoint directory without qwen.tiktoken loads the copy shipped by dashscope, and says so
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(HUB_TOKENIZER_CONFIG))
    with caplog.at_level(logging.INFO, logger="qwen.tokenization_qwen"):
        loaded = QWenTokenizer.from_pretrained(tmp_path)
    assert any("dashscope" in r.getMessage() for r in caplog.records)
    assert loaded.encode("fallback 你好") == tok.encode("fallback 你好")


def test_no_vocabulary_anywhere_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dashscope" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="pip install dashscope"):
        default_vocab_file()


def _hub_dir(tmp_path, with_config: bool):
    shutil.copy(default_vocab_file(), tmp_path / "qwen.tiktoken")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(HUB_TOKENIZER_CONFIG))
    if with_config:
        config = {
            "model_type": "qwen",
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("with_config", [True, False], ids=["with-config", "tokenizer-files-only"])
def test_auto_tokenizer_loads_hub_layout_without_remote_code(tmp_path, with_config, tok):
    from transformers import AutoTokenizer

    import qwen  # noqa: F401  (registers QWenTokenizer with AutoTokenizer)

    loaded = AutoTokenizer.from_pretrained(_hub_dir(tmp_path, with_config))
    assert isinstance(loaded, QWenTokenizer)
    assert loaded.model_max_length == 8192
    assert loaded.encode("<|im_start|>user\n你好") == tok.encode("<|im_start|>user\n你好")
