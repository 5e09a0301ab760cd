"""Tokenizer: BPE training, special tokens, offline save/load, checkpoint tokenizers.

    pytest tests/unit/test_tokenizer.py -q
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from metamorph.data.tokenizer import (
    BOS,
    EOT,
    IMAGE_END,
    IMAGE_START,
    LLAMA3_PAD,
    SPECIAL_TOKENS,
    TokenizerConfig,
    build_tokenizer,
    load_tokenizer,
    special_ids,
    train_bpe,
)

CORPUS = [
    "What colour is the circle?",
    "Red.",
    "Generate an image of a small blue square at the top left.",
    "Answer with the option's letter.\nA. red\nB. blue",
    "Think visually: where is the triangle? 123 4567",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, TokenizerConfig(vocab_size=400))


def test_special_tokens_have_fixed_ids(tok):
    ids = special_ids(tok)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (ids.bos, ids.eot, ids.pad) == (vocab[BOS], vocab[EOT], tok.pad_token_id)
    assert len({ids.bos, ids.start_header, ids.end_header, ids.eot, ids.pad, ids.image_start, ids.image_end}) == 7
    assert tok.eos_token == EOT and tok.bos_token == BOS
    # every byte is encodable and round-trips
    text = "naïve ∑ 🙂 \t\n\n x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_vocab_size_and_merges(tok):
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400
    # merges learned from the corpus: a frequent word is one token, headers are short
    assert len(tok(" colour", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("assistant", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    # no bos added by add_special_tokens=False; specials in text split as text on request
    ids = tok("Red.<|eot_id|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert special_ids(tok).eot not in ids


def test_save_load_offline_roundtrip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        assert len(loaded) == len(tok)
        assert special_ids(loaded) == special_ids(tok)
        text = "Generate an image of a red circle.\n"
        assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_training_is_deterministic(tmp_path):
    a = train_bpe(CORPUS, TokenizerConfig(vocab_size=350))
    b = train_bpe(list(CORPUS), TokenizerConfig(vocab_size=350))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def _base_tokenizer_dir(path, with_llama3_tokens: bool):
    """A stand-in for a checkpoint's tokenizer dir (byte-level BPE with a few merges)."""
    vocab = {t: i for i, t in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    extra = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", LLAMA3_PAD]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    kw = {}
    if with_llama3_tokens:
        tk.add_special_tokens(extra)
        kw = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    PreTrainedTokenizerFast(tokenizer_object=tk, **kw).save_pretrained(path)
    return len(vocab) + (len(extra) if with_llama3_tokens else 0)


@pytest.mark.parametrize("llama3", [True, False])
def test_checkpoint_tokenizer_gets_missing_tokens(tmp_path, llama3):
    n_base = _base_tokenizer_dir(tmp_path / "ckpt", llama3)
    tok = build_tokenizer(TokenizerConfig(path=str(tmp_path / "ckpt")))
    ids = special_ids(tok)
    if llama3:  # only the two image tokens are new; pad reuses Llama-3.1's reserved pad token
        assert len(tok) == n_base + 2
        assert tok.pad_token == LLAMA3_PAD
        assert {ids.image_start, ids.image_end} == {n_base, n_base + 1}
    else:  # four chat tokens, two image tokens and a pad are appended
        assert len(tok) == n_base + 7
    assert tok.convert_ids_to_tokens([ids.image_start, ids.image_end]) == [IMAGE_START, IMAGE_END]
    tok.save_pretrained(tmp_path / "out")
    assert special_ids(load_tokenizer(tmp_path / "out")) == ids


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=200)
    with pytest.raises(ValueError, match="min_frequency"):
        TokenizerConfig(min_frequency=0)
    TokenizerConfig(path="/some/ckpt", vocab_size=0)  # vocab comes from the checkpoint


def test_corpus_texts_make_headers_single_tokens():
    """Fed what rendering really contains, even a small vocab merges the header words first."""
    from metamorph.data.tokenizer import corpus_texts

    convs = [
        [{"role": "user", "content": f"<image>\nWhat colour is shape {i}?"}, {"role": "assistant", "content": "Red."}]
        for i in range(200)
    ]
    tok = train_bpe((t for c in convs for t in corpus_texts(c)), TokenizerConfig(vocab_size=300))
    for text in ("user", "assistant", "\n\n"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1, text
    assert list(corpus_texts(convs[0])) == ["user", "\n\n", "\nWhat colour is shape 0?", "assistant", "\n\n", "Red."]
