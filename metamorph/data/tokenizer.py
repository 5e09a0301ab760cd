"""The text tokenizer: a byte-level BPE trained on the corpus (smoke/tiny), or a checkpoint's own.

    python -m metamorph.data.tokenizer runs/mix/KEY/mixture /tmp/tok --vocab-size 1024

Either way the result is a normal Hugging Face tokenizer dir (``tokenizer.json`` +
``tokenizer_config.json``) that ``transformers.AutoTokenizer.from_pretrained`` loads offline, and
it carries the Llama-3 chat tokens plus VPiT's two image tokens:

* ``<|begin_of_text|>`` (bos), ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``
  (end of turn, also eos), a pad token, ``<image_start>``, ``<image_end>``.

The trained BPE copies Llama-3's pre-tokenisation (its split regex, then byte-level), so words,
numbers and newlines segment the way the cluster-scale tokenizer segments them. A checkpoint's
tokenizer (cluster) keeps its vocabulary; only the tokens it lacks are appended, so the model must
resize its embeddings to ``len(tokenizer)`` (new rows at the mean of the old ones, per DESIGN.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

from metamorph.data.schema import IMAGE_PLACEHOLDER, role_content

if TYPE_CHECKING:  # tokenizers/transformers load inside the functions: configs import fast
    from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"
# Llama-3.1 reserves this token for padding; a checkpoint that has it gets no extra row.
LLAMA3_PAD = "<|finetune_right_pad_id|>"
# Order fixes the ids of a trained tokenizer (0..6): stable across reruns and corpora.
SPECIAL_TOKENS = (BOS, START_HEADER, END_HEADER, EOT, PAD, IMAGE_START, IMAGE_END)
# Llama-3's pre-tokenizer split pattern: contractions, letter runs with one leading non-letter,
# 1-3 digit groups, punctuation runs, newline runs, other whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Strings every rendered conversation contains (chat headers): merged first so a header costs a
# couple of tokens, not one per byte.
TEMPLATE_TEXTS = ("user", "assistant", "system", "\n\n")


@dataclass(kw_only=True)
class TokenizerConfig:
    # HF tokenizer dir or LLM checkpoint dir (cluster: the LLaMA-3.1 8B checkpoint). None: train a
    # byte-level BPE on the mixture's text inside the pipeline (smoke/tiny; nothing downloads).
    path: Optional[str] = None
    # BPE only. Target vocabulary incl. 256 byte symbols and the 7 special tokens. A bigger vocab
    # shortens sequences (fewer positions per answer) but grows the embedding and output matrices
    # (vocab x d each); a small corpus may stop merging below this.
    vocab_size: int = 1024
    # BPE only: a pair seen fewer times is never merged (keeps one-off strings as bytes).
    min_frequency: int = 2
    # BPE only: train on at most this many samples' text (0 = all); the BPE saturates quickly.
    max_train_samples: int = 0

    def __post_init__(self) -> None:
        if self.path is None and self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"tokenize.tokenizer.vocab_size={self.vocab_size} leaves no room for merges: the 256 "
                f"byte symbols and {len(SPECIAL_TOKENS)} special tokens come first; use >= 300"
            )
        if self.min_frequency < 1:
            raise ValueError(f"tokenize.tokenizer.min_frequency={self.min_frequency} must be >= 1")
        if self.max_train_samples < 0:
            raise ValueError(f"tokenize.tokenizer.max_train_samples={self.max_train_samples} must be >= 0 (0 = all)")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the chat template, the model and generation need."""

    bos: int
    start_header: int
    end_header: int
    eot: int  # end of turn: generation stops here
    pad: int  # also the input id at visual positions (their embedding comes from features)
    image_start: int
    image_end: int


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (+ the chat-header strings). Deterministic for the same input."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterable[str]:
        # repeat the header strings so they clear min_frequency even on a tiny corpus
        for _ in range(max(2, cfg.min_frequency)):
            yield from TEMPLATE_TEXTS
        yield from texts

    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, IMAGE_START, IMAGE_END],
    )


def load_base_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A checkpoint's tokenizer with whatever of the chat/image/pad tokens it lacks appended."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    missing = [t for t in (BOS, START_HEADER, END_HEADER, EOT, IMAGE_START, IMAGE_END) if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.bos_token != BOS:
        tok.bos_token = BOS
    if tok.eos_token != EOT:
        # generation stops at the end of the assistant turn, as in Llama-3-Instruct
        tok.eos_token = EOT
    if tok.pad_token is None:
        if LLAMA3_PAD in vocab:
            tok.pad_token = LLAMA3_PAD
        else:
            tok.add_special_tokens({"pad_token": PAD})
    return tok


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """``cfg.path`` set: the checkpoint's tokenizer; else a BPE trained on ``texts``."""
    if cfg.path is not None:
        return load_base_tokenizer(cfg.path)
    if texts is None:
        raise ValueError("training a BPE tokenizer (tokenize.tokenizer.path is null) needs the corpus texts")
    return train_bpe(texts, cfg)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a dir written by ``save_pretrained`` (offline) and check it has every special token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    special_ids(tok)  # raises if a token is missing
    return tok


def special_ids(tok) -> SpecialIds:
    vocab = tok.get_vocab()
    missing = [t for t in (BOS, START_HEADER, END_HEADER, EOT, IMAGE_START, IMAGE_END) if t not in vocab]
    if missing or tok.pad_token_id is None:
        raise ValueError(
            f"tokenizer lacks {missing or ['a pad token']}: build it with metamorph.data.tokenizer.build_tokenizer"
        )
    return SpecialIds(
        bos=vocab[BOS],
        start_header=vocab[START_HEADER],
        end_header=vocab[END_HEADER],
        eot=vocab[EOT],
        pad=int(tok.pad_token_id),
        image_start=vocab[IMAGE_START],
        image_end=vocab[IMAGE_END],
    )


def corpus_texts(conversation: Sequence[Any]) -> Iterator[str]:
    """The text a rendered conversation contains, piece by piece: the BPE training corpus.

    Role names and the header's "\\n\\n" come once per turn, as often as rendering uses them, so
    the BPE merges them in proportion to their real frequency (two headers per sample).
    """
    for turn in conversation:
        role, content = role_content(turn)
        yield role
        yield "\n\n"
        for piece in content.split(IMAGE_PLACEHOLDER):
            if piece:
                yield piece


def main() -> None:
    from metamorph.data.shards import iter_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mixture", help="a dir of curated-sample shards")
    ap.add_argument("out", help="where to save the tokenizer dir")
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args()
    texts = (t for sample, _ in iter_samples(args.mixture) for t in corpus_texts(sample.conversation))
    tok = train_bpe(texts, TokenizerConfig(vocab_size=args.vocab_size))
    tok.save_pretrained(args.out)
    print(f"vocab {len(tok)} -> {args.out}; special ids {special_ids(tok)}")


if __name__ == "__main__":
    main()
