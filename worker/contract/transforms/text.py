"""Text transforms: a string -> token ids (and their attention mask and token types).

* ``tokenizer``: a Hugging Face ``tokenizer.json`` (WordPiece, BPE, Unigram: what BERT-,
  CLIP-, T5-style models ship) through the ``tokenizers`` library, truncated and padded
  to ``max_length``; it makes ``input_ids``, ``attention_mask`` and ``token_type_ids``.
  The file is stored beside the model and covered by the manifest's hashes.
* ``words``: the reference model's word list (lowercase words of ``[a-z0-9']`` looked up
  in ``vocabulary``, unknown words as ``oov_id``, padded with ``pad_id``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import ModelError
from worker.contract.transforms.base import Parameters, TensorOut, check, from_dict
from worker.contract.transforms.media import TEXT_TYPES, Limits, read_text

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"

_WORD = re.compile(r"[a-z0-9']+")
#: Words random texts are drawn from when a tokenizer has no plain-word vocabulary.
_SAMPLE_WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "birds",
    "sing",
    "about",
    "numbers",
    "photos",
    "music",
    "weather",
    "reports",
    "and",
    "ideas",
    "from",
    "every",
    "part",
    "of",
    "the",
    "world",
)


def _sample_text(words: Sequence[str], rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 12))  # an empty record is refused: at least one word
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), n))


class _Text(Parameters):
    """The text family: UTF-8 (its length checked first); the empty text is blank."""

    max_chars: int

    def content_types(self) -> tuple[str, ...]:
        return TEXT_TYPES

    def decode(self, value: bytes, media: str, params: dict[str, str], limits: Limits) -> str:
        return read_text(value, params.get("charset", "utf-8"), self.max_chars)

    def blank_media(self) -> str:
        return ""


@dataclass(frozen=True)
class WordsTransform(_Text):
    """The reference word tokenizer: a string -> ``[max_length]`` ids.

    Attributes:
        vocabulary: token strings; a token's id is its index.
        max_length: ids per example; longer texts are truncated, shorter padded.
        pad_id: the id of padding (the model masks it out).
        oov_id: the id of words not in the vocabulary.
        max_chars: longer texts are refused before tokenising.
    """

    vocabulary: tuple[str, ...]
    max_length: int = 16
    pad_id: int = 0
    oov_id: int = 1
    max_chars: int = 4096

    kind: ClassVar[str] = "words"
    family: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        cls = type(self)
        check(len(self.vocabulary) >= 2, cls, "vocabulary needs at least 2 tokens")
        check(self.max_length > 0 and self.max_chars > 0, cls, "lengths must be > 0")
        n = len(self.vocabulary)
        check(0 <= self.pad_id < n and 0 <= self.oov_id < n, cls, "ids outside the vocabulary")

    def shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    def outputs(self) -> dict[str, TensorOut]:
        return {
            INPUT_IDS: TensorOut(self.shape(), "int"),
            ATTENTION_MASK: TensorOut(self.shape(), "int"),
        }

    def apply(self, media: str) -> dict[str, NDArray[Any]]:
        ids = tokenize(media, self)
        return {INPUT_IDS: ids, ATTENTION_MASK: (ids != self.pad_id).astype(np.int32)}

    def apply_batch(self, media: Sequence[str]) -> dict[str, NDArray[Any]]:
        ids = np.stack([tokenize(m, self) for m in media])
        return {INPUT_IDS: ids, ATTENTION_MASK: (ids != self.pad_id).astype(np.int32)}

    def sample_media(self, rng: np.random.Generator) -> str:
        words = [w for w in self.vocabulary if _WORD.fullmatch(w)] or _SAMPLE_WORDS
        return _sample_text(words, rng)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.vocabulary)}


def tokenize(text: str, spec: WordsTransform) -> NDArray[np.int32]:
    """A string -> int32 ``[max_length]`` ids, padded with ``pad_id``."""
    ids = np.full(spec.max_length, spec.pad_id, dtype=np.int32)
    index = spec.index
    words = _WORD.findall(text.lower())[: spec.max_length]
    for i, word in enumerate(words):
        ids[i] = index.get(word, spec.oov_id)
    return ids


@dataclass(frozen=True)
class TokenizerTransform(_Text):
    """A Hugging Face tokenizer: a string -> ``[max_length]`` ids, mask and token types.

    Attributes:
        file: the ``tokenizer.json`` in the model directory (its sha256 is in the
            manifest's ``files``).
        max_length: tokens per example, special tokens included; longer texts are
            truncated (at the end), shorter ones padded (at the end).
        add_special_tokens: add the tokenizer's ``[CLS]``/``[SEP]``, ``<s>``/``</s>``, ...
        pad_id: the padding id; None: the tokenizer's own padding id, else the id of the
            first of ``[PAD]``, ``<pad>``, ``<|endoftext|>`` it knows, else 0.
        max_chars: longer texts are refused before tokenising.
        base_dir: where ``file`` is (the model directory; not in the manifest).
    """

    file: str = "tokenizer.json"
    max_length: int = 128
    add_special_tokens: bool = True
    pad_id: int | None = None
    max_chars: int = 16384
    base_dir: Path | None = field(
        default=None, compare=False, repr=False, metadata={"manifest": False}
    )

    kind: ClassVar[str] = "tokenizer"
    family: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        cls = type(self)
        check(self.max_length > 0 and self.max_chars > 0, cls, "lengths must be > 0")
        check(
            bool(self.file) and Path(self.file).name == self.file,
            cls,
            f"file must be a file name in the model directory, not {self.file!r}",
        )

    def shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    def outputs(self) -> dict[str, TensorOut]:
        out = TensorOut(self.shape(), "int")
        return {INPUT_IDS: out, ATTENTION_MASK: out, TOKEN_TYPE_IDS: out}

    def apply(self, media: str) -> dict[str, NDArray[Any]]:
        enc = self.tokenizer.encode(media, add_special_tokens=self.add_special_tokens)
        return {
            INPUT_IDS: np.asarray(enc.ids, dtype=np.int64),
            ATTENTION_MASK: np.asarray(enc.attention_mask, dtype=np.int64),
            TOKEN_TYPE_IDS: np.asarray(enc.type_ids, dtype=np.int64),
        }

    def apply_batch(self, media: Sequence[str]) -> dict[str, NDArray[Any]]:
        encs = self.tokenizer.encode_batch(list(media), add_special_tokens=self.add_special_tokens)
        return {
            INPUT_IDS: np.asarray([e.ids for e in encs], dtype=np.int64),
            ATTENTION_MASK: np.asarray([e.attention_mask for e in encs], dtype=np.int64),
            TOKEN_TYPE_IDS: np.asarray([e.type_ids for e in encs], dtype=np.int64),
        }

    def sample_media(self, rng: np.random.Generator) -> str:
        words = [w for w in self.tokenizer.get_vocab() if w.isalpha() and w.islower()]
        return _sample_text(sorted(words) or _SAMPLE_WORDS, rng)

    def files(self) -> tuple[str, ...]:
        return (self.file,)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> TokenizerTransform:
        return from_dict(cls, data, base_dir=base_dir)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The loaded ``tokenizers.Tokenizer``, set to truncate and pad to ``max_length``."""
        return load_tokenizer(self)

    def load(self) -> None:
        """Load the tokenizer now (a missing or bad file is a :class:`ModelError`)."""
        _ = self.tokenizer


def load_tokenizer(spec: TokenizerTransform) -> Any:
    from tokenizers import Tokenizer

    if spec.base_dir is None:
        raise ModelError(f"tokenizer {spec.file!r}: no model directory to load it from")
    path = Path(spec.base_dir) / spec.file
    if not path.is_file():
        raise ModelError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own untyped exceptions
        raise ModelError(f"cannot load tokenizer {path}: {exc}") from exc
    pad_id = spec.pad_id
    if pad_id is None:
        padding = tok.padding
        pad_id = padding["pad_id"] if padding else _known_pad_id(tok)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not 0 <= pad_id < vocab:
        raise ModelError(f"tokenizer {path}: pad_id {pad_id} is outside its vocabulary of {vocab}")
    pad_token = tok.id_to_token(pad_id) or "[PAD]"
    special = tok.num_special_tokens_to_add(False)
    if spec.max_length <= special:
        raise ModelError(
            f"tokenizer {path}: max_length {spec.max_length} leaves no room for text beside "
            f"its {special} special tokens"
        )
    tok.enable_truncation(max_length=spec.max_length)
    tok.enable_padding(length=spec.max_length, pad_id=pad_id, pad_token=pad_token)
    return tok


def _known_pad_id(tok: Any) -> int:
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        found = tok.token_to_id(token)
        if found is not None:
            return int(found)
    return 0
