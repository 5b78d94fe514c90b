"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with fixed special tokens at ids 0..15.

There is deliberately no normalizer inside the tokenizer: byte-level BPE then maps any Unicode string to
bytes and back, so decode(encode(x)) == x exactly (emoji, combining marks, '\\r', odd whitespace). Text is
NFC-normalized by the data pipeline instead (`sources.iter_texts`), before tokenizer training and before
encoding, so training and encoding see the same form while the tokenizer itself stays lossless.
"""

from __future__ import annotations

import hashlib
import itertools
import json
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


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json names it: a string, {"content": ...} (an AddedToken), or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object")
    return data


class Tokenizer:
    """A tokenizer.json: one astrai-ds trained (its special tokens <pad>, <bos>, <eos>, <|im_start|>, <|im_end|>,
    ChatML), or a pretrained model's with the special tokens and chat template its folder names
    (tokenizer_config.json, chat_template.jinja, generation_config.json beside it). Load with
    `Tokenizer.load(path)`."""

    def __init__(self, path: Path, data: bytes, config: dict | None = None, generation: dict | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise DataError(f"tokenizer file {path} is damaged ({e}); {CREATE_HINT}") from None
        self._hf = hf
        self._path = path
        self._hash = hashlib.sha256(data).hexdigest()
        self._special_hf = None
        # ours: every astrai-ds special token there. Then the ChatML rendering of data/chat.py applies, exactly.
        self.native = all(hf.token_to_id(token) is not None for token in SPECIAL_TOKENS[:5])
        self.chat_template: str | None = None  # a pretrained model's own template (None: ours)
        self.special_tokens: dict[str, str | None] = {}  # bos_token, eos_token, ... as the template sees them
        if self.native:
            self._pad, self._bos, self._eos = (hf.token_to_id(t) for t in SPECIAL_TOKENS[:3])
            self._add_bos = True
            self._stops = frozenset({self._eos, hf.token_to_id("<|im_end|>")})
        else:
            self._from_folder(config, generation, chat_template)
        self._specials = {text for text, special in self.added_tokens().items() if special} | set(SPECIAL_TOKENS)
        # byte-level BPE (ours, GPT-2's, Llama 3's, Qwen's) or SentencePiece-style pieces: read from the file's JSON
        self._byte_level = "ByteLevel" in json.dumps(json.loads(data).get("decoder"))
        # Special-token strings inside ordinary text (a document that mentions "<eos>") stay plain text,
        # so data cannot inject control tokens and decode(encode(x)) == x holds for every x.
        hf.encode_special_tokens = True

    def _from_folder(self, config: dict | None, generation: dict | None, chat_template: str | None) -> None:
        """A pretrained model's tokenizer: its special tokens from tokenizer_config.json, every eos_token_id of
        generation_config.json as a stop token, its chat template."""
        path, hf = self._path, self._hf
        if config is None:
            raise DataError(f"tokenizer {path} has none of astrai-ds's special tokens (<pad>, <bos>, <eos>) and no "
                            f"tokenizer_config.json beside it naming its own: keep the model folder's "
                            f"tokenizer_config.json beside it, or {CREATE_HINT}")
        names = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        ids = {}
        for key, text in names.items():
            ids[key] = hf.token_to_id(text) if text is not None else None
            if text is not None and ids[key] is None:
                raise DataError(f"{path.parent / 'tokenizer_config.json'}: {key} {text!r} is not a token of {path}")
        if ids["eos_token"] is None:
            raise DataError(f"{path.parent / 'tokenizer_config.json'} names no eos_token: generation could not stop")
        self.special_tokens = names
        self._bos, self._eos = ids["bos_token"], ids["eos_token"]
        # padding: the folder's pad token, else its end of sequence (never a new token)
        self._pad = ids["pad_token"] if ids["pad_token"] is not None else self._eos
        # a BOS where the tokenizer adds one itself (its post-processor, or add_bos_token)
        adds = hf.encode("a", add_special_tokens=True).ids
        self._add_bos = self._bos is not None and (bool(config.get("add_bos_token")) or adds[:1] == [self._bos])
        stops = {self._eos}
        wanted = (generation or {}).get("eos_token_id")
        for token_id in (wanted if isinstance(wanted, list) else [wanted]):
            if isinstance(token_id, int) and 0 <= token_id < hf.get_vocab_size(with_added_tokens=True):
                stops.add(token_id)
        self._stops = frozenset(stops)
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) and template.strip() else None

    def added_tokens(self) -> dict[str, bool]:
        """The tokens added on top of the BPE vocabulary, each with whether it is special (a control token)."""
        return {t.content: t.special for t in self._hf.get_added_tokens_decoder().values()}

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load from a folder holding tokenizer.json, or from the file itself; the files a model folder keeps
        beside it (tokenizer_config.json, chat_template.jinja, generation_config.json) are read where there."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"tokenizer not found: {file}; {CREATE_HINT}")
        folder = file.parent
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else None
        generation = (_read_json(folder / "generation_config.json")
                      if (folder / "generation_config.json").is_file() else None)
        template = folder / "chat_template.jinja"
        return cls(file, file.read_bytes(), config, generation,
                   template.read_text(encoding="utf-8") if template.is_file() else None)

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
        """The padding token: ours <pad>; a pretrained model's pad token, else its eos token."""
        return self._pad

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence token (None where the model has none)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def prefix_ids(self) -> list[int]:
        """What starts a plain-text sequence: [bos_id] where the model's tokenizer adds a BOS (ours always),
        else nothing."""
        return [self._bos] if self._add_bos else []

    @property
    def stop_ids(self) -> frozenset[int]:
        """Every token that ends generation: ours <eos> and <|im_end|>; a pretrained model's eos token and every
        eos_token_id of its generation_config.json."""
        return self._stops

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
        if token in self._specials:
            return token.encode("utf-8")
        if self._byte_level:
            return bytes(_BYTE_LEVEL_DECODE[c] for c in token)
        # SentencePiece-style (Llama 2, Mistral): "▁" for a space, <0xHH> for a byte the vocabulary lacks
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode("utf-8")

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` with special-token strings as their ids (a rendered chat template), and each token's
        (start, end) character offsets in `text`."""
        encoding = self._encoder(True).encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

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
