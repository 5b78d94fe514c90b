"""Flat token shards: the concatenated token stream of a corpus, split into raw binary files.

A shard folder holds `tokens_00000.bin`, ... (raw little-endian uint16 or uint32 token ids),
`doc_offsets_00000.npy`, ... (int64 start of every document inside its shard) and `index.json`, written
last and atomically, so a folder with an index.json is complete. A shard holds whole documents: it closes
before the document that would overflow `shard_tokens` (one document longer than that gets a shard alone).

SFT and DPO shards also carry a loss mask, one uint8 (0 or 1) per token, in `masks_00000.bin`, ...
parallel to the token files; each shard's entry in the index names its mask file. PT shards have none.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

import numpy as np

from astrai_ds.errors import DataError

FORMAT = "astrai_ds.token_shards"
VERSION = 1
INDEX_FILE = "index.json"
TOKENS_PATTERN = "tokens_{:05d}.bin"
OFFSETS_PATTERN = "doc_offsets_{:05d}.npy"
MASKS_PATTERN = "masks_{:05d}.bin"
MASK_DTYPE = np.dtype("u1")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Keys of index.json owned by the shard format; `meta` may not use them.
RESERVED_KEYS = ("format", "version", "dtype", "num_tokens", "num_documents", "shards")
PREPARE_HINT = "astrai-ds prepare --stage pt --input FILE... --tokenizer DIR --out {path}"


def dtype_for(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def remove_shards(out_dir) -> None:
    """Delete a shard folder's index.json (first, so a half-removed folder never looks complete) and
    its shard files; other files are left alone."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    (out / INDEX_FILE).unlink(missing_ok=True)
    (out / (INDEX_FILE + ".tmp")).unlink(missing_ok=True)
    for pattern in ("tokens_*.bin", "doc_offsets_*.npy", "masks_*.bin"):
        for p in out.glob(pattern):
            p.unlink()


class ShardWriter:
    """Append documents' token ids to shards. `add(ids)` per document (the caller adds bos/eos), then
    `close()` writes index.json with the shard list and everything in `meta`. With `masks=True` every
    document comes with its loss mask: `add(ids, mask)`."""

    FLUSH_TOKENS = 1 << 20  # tokens buffered in memory before a write

    def __init__(self, out_dir, vocab_size: int, meta: dict, shard_tokens: int = 2**28, masks: bool = False):
        clash = [k for k in meta if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"meta may not use the index keys {clash}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        if any(self.out_dir.glob("tokens_*.bin")) or (self.out_dir / INDEX_FILE).exists():
            raise DataError(f"{self.out_dir} already holds token shards; remove them first (remove_shards)")
        self.vocab_size = vocab_size
        self.dtype_name = dtype_for(vocab_size)
        self.dtype = DTYPES[self.dtype_name]
        self.meta = dict(meta)
        self.shard_tokens = shard_tokens
        self.masks = masks
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._file = None
        self._mask_file = None
        self._buffer: list[np.ndarray] = []
        self._mask_buffer: list[np.ndarray] = []
        self._buffered = 0
        self._shard_len = 0
        self._offsets = array("q")  # 8 bytes per document of the open shard
        self._closed = False

    def add(self, ids, mask=None) -> None:
        """Append one document (a sequence of token ids, at least one), with its mask (0/1 per token) when
        the writer was made with masks=True."""
        tokens = np.asarray(ids)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"a document must be a non-empty 1-D sequence of token ids, got shape {tokens.shape}")
        if (mask is not None) != self.masks:
            raise ValueError("this writer stores masks: pass add(ids, mask)" if self.masks
                             else "this writer stores no masks (make it with masks=True)")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"the mask has shape {mask.shape}, the tokens {tokens.shape}")
            if mask.size and (mask.min() < 0 or mask.max() > 1):
                raise ValueError("mask values must be 0 or 1")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"token id {hi if hi >= self.vocab_size else lo} is outside the vocabulary (size "
                f"{self.vocab_size}); the tokenizer does not match vocab_size"
            )
        if self._file is not None and self._shard_len + len(tokens) > self.shard_tokens:
            self._finish_shard()
        if self._file is None:
            self._open_shard()
        self._offsets.append(self._shard_len)
        self._buffer.append(tokens.astype(self.dtype, copy=False))
        if mask is not None:
            self._mask_buffer.append(mask.astype(MASK_DTYPE, copy=False))
        self._buffered += len(tokens)
        self._shard_len += len(tokens)
        self.num_tokens += len(tokens)
        self.num_documents += 1
        if self._buffered >= self.FLUSH_TOKENS:
            self._flush()

    def _open_shard(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / TOKENS_PATTERN.format(len(self.shards)), "wb")
        if self.masks:
            self._mask_file = open(self.out_dir / MASKS_PATTERN.format(len(self.shards)), "wb")
        self._shard_len = 0
        self._offsets = array("q")

    def _flush(self) -> None:
        if self._buffer:
            self._file.write(np.concatenate(self._buffer).tobytes())
        if self._mask_buffer:
            self._mask_file.write(np.concatenate(self._mask_buffer).tobytes())
        self._buffer, self._mask_buffer, self._buffered = [], [], 0

    def _finish_shard(self) -> None:
        self._flush()
        self._file.close()
        self._file = None
        i = len(self.shards)
        np.save(self.out_dir / OFFSETS_PATTERN.format(i), np.frombuffer(self._offsets, dtype=np.int64))
        shard = {
            "tokens": TOKENS_PATTERN.format(i),
            "offsets": OFFSETS_PATTERN.format(i),
            "num_tokens": self._shard_len,
            "num_documents": len(self._offsets),
        }
        if self._mask_file is not None:
            self._mask_file.close()
            self._mask_file = None
            shard["masks"] = MASKS_PATTERN.format(i)
        self.shards.append(shard)

    def close(self) -> dict:
        """Finish the last shard and write index.json atomically; returns the index."""
        if self._closed:
            raise ValueError("ShardWriter is already closed")
        if self._file is not None:
            self._finish_shard()
        self._closed = True
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype_name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "shards": self.shards,
            **self.meta,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / INDEX_FILE)
        return index

    def abort(self) -> None:
        """Close the open file after a failure; index.json is not written, so the folder reads as absent."""
        for f in (self._file, self._mask_file):
            if f is not None:
                f.close()
        self._file = self._mask_file = None
        self._closed = True


class TokenShards:
    """Read-only view of a shard folder: `read(start, length)` copies any window of the token stream, and
    `read_mask(start, length)` the same window of the loss mask where the shards have one (`has_masks`)."""

    def __init__(self, path):
        path = Path(path)
        self.path = path.parent if path.name == INDEX_FILE else path
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise DataError(
                f"no token shards at {self.path} ({INDEX_FILE} is missing); make them with "
                f"`{PREPARE_HINT.format(path=self.path)}`"
            )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{index_path} is damaged ({e}); re-run `astrai-ds prepare`") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{index_path} is not an astrai_ds token shard index; re-run `astrai-ds prepare`")
        if index.get("version") != VERSION or index.get("dtype") not in DTYPES:
            raise DataError(
                f"{index_path}: shard format version {index.get('version')} with dtype {index.get('dtype')!r} "
                f"is not supported (expected version {VERSION}); re-run `astrai-ds prepare`"
            )
        self.index = index
        self.dtype = DTYPES[index["dtype"]]
        self.num_tokens = int(index["num_tokens"])
        self.num_documents = int(index["num_documents"])
        sizes = []
        with_masks = ["masks" in shard for shard in index["shards"]]
        if any(with_masks) and not all(with_masks):
            raise DataError(f"{index_path}: only some shards have a mask file; re-run `astrai-ds prepare` for "
                            f"{self.path}")
        self.has_masks = bool(with_masks) and all(with_masks)
        for shard in index["shards"]:
            files = [("token shard", shard["tokens"], self.dtype, index["dtype"])]
            if self.has_masks:
                files.append(("mask shard", shard["masks"], MASK_DTYPE, "uint8"))
            for kind, name, dtype, dtype_name in files:
                file = self.path / name
                expected = shard["num_tokens"] * dtype.itemsize
                actual = file.stat().st_size if file.is_file() else None
                if actual != expected:
                    found = "it is missing" if actual is None else f"it has {actual} bytes"
                    raise DataError(
                        f"{kind} {file} is damaged: expected {expected} bytes ({shard['num_tokens']} tokens of "
                        f"{dtype_name}), {found}; re-run `astrai-ds prepare` for {self.path}"
                    )
            if not (self.path / shard["offsets"]).is_file():
                raise DataError(f"{self.path / shard['offsets']} is missing; re-run `astrai-ds prepare` for {self.path}")
            sizes.append(shard["num_tokens"])
        if sum(sizes) != self.num_tokens:
            raise DataError(f"{index_path}: the shards hold {sum(sizes)} tokens, not {self.num_tokens}; re-run prepare")
        # starts[i] is the stream position of shard i's first token; starts[-1] == num_tokens.
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._maps: list[np.memmap] | None = None
        self._mask_maps: list[np.memmap] | None = None

    @property
    def meta(self) -> dict:
        """The caller's metadata (stage, tokenizer_hash, vocab_size, seq_len, ...), without the format keys."""
        return {k: v for k, v in self.index.items() if k not in RESERVED_KEYS}

    @property
    def num_shards(self) -> int:
        return len(self.index["shards"])

    def _memmaps(self) -> list[np.memmap]:
        # Opened on the first read, so opening a folder only to check its index maps nothing.
        if self._maps is None:
            self._maps = [np.memmap(self.path / s["tokens"], dtype=self.dtype, mode="r", shape=(s["num_tokens"],))
                          for s in self.index["shards"]]
        return self._maps

    def _mask_memmaps(self) -> list[np.memmap]:
        if self._mask_maps is None:
            self._mask_maps = [np.memmap(self.path / s["masks"], dtype=MASK_DTYPE, mode="r", shape=(s["num_tokens"],))
                               for s in self.index["shards"]]
        return self._mask_maps

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as a new int64 array, across shard boundaries."""
        return self._read(self._memmaps(), np.int64, start, length)

    def read_mask(self, start: int, length: int) -> np.ndarray:
        """The loss mask of tokens [start, start + length) as a new uint8 array (1 = trained)."""
        if not self.has_masks:
            raise DataError(f"the shards at {self.path} have no loss mask (stage {self.meta.get('stage', 'pt')!r}); "
                            f"SFT and DPO data are made with `astrai-ds prepare --stage sft` or `--stage dpo`")
        return self._read(self._mask_memmaps(), MASK_DTYPE, start, length)

    def _read(self, maps: list[np.memmap], dtype, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside the {self.num_tokens} tokens")
        out = np.empty(length, dtype=dtype)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, filled = start, 0
        while filled < length:
            local = pos - int(self._starts[shard])
            take = min(length - filled, int(self._starts[shard + 1]) - pos)
            out[filled:filled + take] = maps[shard][local:local + take]
            filled += take
            pos += take
            shard += 1
        return out

    def document_starts(self) -> np.ndarray:
        """Stream position of every document's first token (int64, 8 bytes per document)."""
        parts = [np.load(self.path / s["offsets"]) + self._starts[i] for i, s in enumerate(self.index["shards"])]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def document_lengths(self) -> np.ndarray:
        """Tokens in every document (int64)."""
        return np.diff(np.append(self.document_starts(), self.num_tokens))

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, num_tokens={self.num_tokens}, shards={self.num_shards})"
