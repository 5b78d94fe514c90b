"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with fixed special tokens at ids 0..15.

There is deliberately no normalizer inside the tokenizer: byte-level BPE then maps any Unicode string to
bytes and back, so decode(encode(x)) == x exactly (emoji, combining marks, '\\r', odd whitespace). Text is
NFC-normalized by the data pipeline instead (`sources.iter_texts`), before tokenizer training and before
encoding, so training and encoding see the same form while the tokenizer itself stays lossless.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from pathlib import Path
from typing import Iterable, Iterator

from astrai_ds.data.sources import check_out_dir, expand_inputs, iter_texts
from astrai_ds.errors import DataError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(11)]
N_BYTES = 256  # the byte-level initial alphabet
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"
CREATE_HINT = "create one with `astrai-ds tokenizer --input FILE... --vocab-size N --out DIR`"


def _training_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from iter_texts(path)  # strict: a damaged record raises DataError naming file and line


def train_tokenizer(files: list, vocab_size: int, out_dir, progress: bool = True) -> Path:
    """Train a byte-level BPE tokenizer on `.txt`/`.jsonl` files and write `out_dir/tokenizer.json`.

    The files are streamed (never loaded whole). Returns the path of the written tokenizer.json. The
    vocabulary may come out smaller than `vocab_size` when the corpus has too few distinct pairs to merge.
    `progress` shows the tokenizers library's progress bars on a terminal."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"tokenizer vocab_size {vocab_size!r} is too small: the minimum is {MIN_VOCAB_SIZE} "
            f"({N_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    out = check_out_dir(out_dir, "the tokenizer")
    paths = expand_inputs(files)
    texts = _training_texts(paths)
    first = next(texts, None)
    if first is None:
        raise DataError(f"cannot train a tokenizer on an empty corpus: no text in {', '.join(map(str, paths))}")

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # numbers as digit sequences: arithmetic stays learnable
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # added first, so they get ids 0..15 in order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The library draws its bars on a terminal only; elsewhere (a log file, a pipe) it writes blank
        # lines to stdout instead, so ask for them only when stderr is a terminal.
        show_progress=progress and sys.stderr.isatty(),
    )
    tok.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each of the 256 bytes is written as one printable character;
    this maps the characters back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL_DECODE = _byte_level_alphabet()


class Tokenizer:
    """A trained tokenizer.json with the astrai_ds special tokens. Load with `Tokenizer.load(path)`."""

    def __init__(self, path: Path, data: bytes):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise DataError(f"tokenizer file {path} is damaged ({e}); {CREATE_HINT}") from None
        for token in SPECIAL_TOKENS[:5]:
            if hf.token_to_id(token) is None:
                raise DataError(
                    f"tokenizer {path} has no special token {token}: it was not made by astrai-ds; {CREATE_HINT}"
                )
        # Special-token strings inside ordinary text (a document that mentions "<eos>") stay plain text,
        # so data cannot inject control tokens and decode(encode(x)) == x holds for every x.
        hf.encode_special_tokens = True
        self._hf = hf
        self._path = path
        self._hash = hashlib.sha256(data).hexdigest()
        self._special_hf = None

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load from a folder holding tokenizer.json, or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"tokenizer not found: {file}; {CREATE_HINT}")
        return cls(file, file.read_bytes())

    @property
    def path(self) -> Path:
        """The tokenizer.json file."""
        return self._path

    @property
    def hash(self) -> str:
        """sha256 (hex) of the tokenizer.json bytes: shards and checkpoints record it to catch mismatches."""
        return self._hash

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._hf.token_to_id("<pad>")

    @property
    def bos_id(self) -> int:
        return self._hf.token_to_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self._hf.token_to_id("<eos>")

    @property
    def im_start_id(self) -> int:
        return self._hf.token_to_id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._hf.token_to_id("<|im_end|>")

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a byte-level token may hold part of a UTF-8 character); a special token
        gives its own text."""
        token = self._hf.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        if token in SPECIAL_TOKENS:
            return token.encode("utf-8")
        return bytes(_BYTE_LEVEL_DECODE[c] for c in token)

    def _encoder(self, allow_special: bool):
        if not allow_special:
            return self._hf
        if self._special_hf is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._special_hf = HFTokenizer.from_str(self._hf.to_str())
            self._special_hf.encode_special_tokens = False
        return self._special_hf

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; no bos/eos is added. With `allow_special`, special-token strings such as
        "<|im_start|>" in the text become their ids (for chat templates); otherwise they are plain text."""
        return self._encoder(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], allow_special: bool = False) -> list[list[int]]:
        encodings = self._encoder(allow_special).encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True):
        """An incremental decoder for generation: `step(token_id)` returns the new text, or None while the
        tokens so far end inside a character (byte-level BPE splits a Chinese character across tokens)."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self._hf, int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"
