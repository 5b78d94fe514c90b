"""Training samples over token shards, and their collate functions (torch tensors), one pair per stage:

- pt: `PretrainDataset` (fixed windows of the token stream) and `collate_pretrain`;
- sft: `SFTDataset` (conversations, packed several to a sequence or one per item) and `collate_sft`;
- dpo: `DPODataset` (chosen and rejected documents of one pair) and `collate_dpo`.

Each dataset checks that its shards were prepared for its stage.
"""

from __future__ import annotations

import numpy as np
import torch

from astrai_ds.data.shards import TokenShards
from astrai_ds.errors import DataError

IGNORE_INDEX = -100  # label that takes no part in the loss; the same value as training.losses.IGNORE_INDEX
_INPUT_HINT = {"pt": "TEXT.jsonl", "sft": "CHATS.jsonl", "dpo": "PAIRS.jsonl"}


def require_stage(shards: TokenShards, stage: str) -> None:
    """DataError unless `shards` were prepared for `stage` (an index without a stage is pt data)."""
    found = shards.meta.get("stage", "pt")
    if found != stage:
        raise DataError(
            f"{shards.path} holds '{found}' data (made by `astrai-ds prepare --stage {found}`), but a '{stage}' "
            f"dataset needs data made by `astrai-ds prepare --stage {stage} --input {_INPUT_HINT[stage]} "
            f"--tokenizer DIR --out DIR`; point the config at such a folder"
        )
    if stage != "pt" and not shards.has_masks:
        raise DataError(f"{shards.path} has no loss masks, which '{stage}' data must have; re-run "
                        f"`astrai-ds prepare --stage {stage} ...` for it")


class PretrainDataset(torch.utils.data.Dataset):
    """Fixed windows over the concatenated token stream: sample i is tokens [i*seq_len, (i+1)*seq_len + 1),
    so input = sample[:-1] and target = sample[1:]. Windows cross document boundaries (documents are
    separated by bos/eos) and the last window's extra token overlaps the next window's first."""

    def __init__(self, shards: TokenShards, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        require_stage(shards, "pt")
        self.shards = shards
        self.seq_len = seq_len
        self._len = (shards.num_tokens - 1) // seq_len if shards.num_tokens > 0 else 0
        if self._len == 0:
            raise DataError(
                f"the corpus at {shards.path} has {shards.num_tokens} tokens, too few for one window of "
                f"seq_len {seq_len} (needs {seq_len + 1}); add data or lower seq_len"
            )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        """(seq_len + 1,) int64 token ids."""
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} is out of range for {self._len} samples")
        return self.shards.read(i * self.seq_len, self.seq_len + 1)


def collate_pretrain(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Stack windows into {"input_ids": (B, T), "labels": (B, T)} int64 tensors, labels shifted by one."""
    batch = torch.from_numpy(np.stack(samples).astype(np.int64, copy=False))  # (B, T + 1)
    return {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


def _labels(tokens: np.ndarray, mask: np.ndarray, same_segment: np.ndarray | None = None) -> np.ndarray:
    """Targets of inputs tokens[:-1]: the next token where its mask is 1 (and, packed, where it belongs to the
    same segment), else IGNORE_INDEX."""
    keep = mask[1:] == 1
    if same_segment is not None:
        keep &= same_segment
    return np.where(keep, tokens[1:], IGNORE_INDEX)


def first_fit(lengths, capacity: int) -> list[list[int]]:
    """Pack items into bins of `capacity`: each item, in order, goes into the first bin with room for it
    (first-fit; deterministic). Returns the bins' item indices, bins in the order they were opened.

    A max-tree over the bins' free space finds that bin in O(log n): leaves not yet opened hold the whole
    capacity, so the leftmost leaf with room is either an open bin or the next new one."""
    lengths = [int(n) for n in lengths]
    if any(not 0 < n <= capacity for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [0] * size + [capacity] * size  # tree[1] is the root; leaf b is tree[size + b]
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class SFTDataset(torch.utils.data.Dataset):
    """Conversations from `prepare --stage sft` shards, packed or one per item.

    A conversation longer than seq_len + 1 tokens (seq_len inputs and their targets) is cut to its first
    seq_len + 1 tokens (overlong="truncate") or left out (overlong="drop"); a cut that keeps no assistant
    token leaves it out too. Counts: `num_truncated`, `num_dropped`; `num_conversations` are used.

    With packing, the conversations are packed in order, first-fit, into sequences of seq_len + 1 token slots
    (`first_fit`), and an item is one packed sequence; without, an item is one conversation. An item is a
    dict of numpy arrays of length L <= seq_len + 1: "tokens" (int64), "mask" (uint8, 1 = trained target),
    "doc_ids" (int64, the conversation's index within the item: 0, 1, ...) and "positions" (int64, restarting
    at 0 for every conversation). `collate_sft` turns items into a batch.
    """

    def __init__(self, shards: TokenShards, seq_len: int, packing: bool = True, overlong: str = "truncate"):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if overlong not in ("truncate", "drop"):
            raise DataError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        require_stage(shards, "sft")
        self.shards, self.seq_len, self.packing, self.overlong = shards, seq_len, packing, overlong
        capacity = seq_len + 1
        starts, lengths = shards.document_starts(), shards.document_lengths()
        keep = lengths <= capacity
        self.num_truncated = 0
        if overlong == "truncate":
            for d in np.flatnonzero(~keep):
                # The cut must keep a trained target (positions 1..seq_len), or the sample teaches nothing.
                if shards.read_mask(int(starts[d]) + 1, seq_len).any():
                    keep[d] = True
                    self.num_truncated += 1
        self.num_dropped = int((~keep).sum())
        self._starts = starts[keep]
        self._lengths = np.minimum(lengths[keep], capacity)
        self.num_conversations = len(self._starts)
        if self.num_conversations == 0:
            raise DataError(f"no conversation in {shards.path} fits seq_len {seq_len} ({self.num_dropped} longer "
                            f"ones dropped, overlong={overlong!r}); raise data.seq_len or use overlong='truncate'")
        if packing:
            bins = first_fit(self._lengths, capacity)
            self._items = [np.asarray(b, dtype=np.int64) for b in bins]
        else:
            self._items = [np.asarray([i], dtype=np.int64) for i in range(self.num_conversations)]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def fill(self) -> float:
        """Share of the items' seq_len + 1 token slots that hold conversation tokens (the rest is padding)."""
        return float(self._lengths.sum()) / (len(self._items) * (self.seq_len + 1))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if i < 0:
            i += len(self._items)
        if not 0 <= i < len(self._items):
            raise IndexError(f"item {i} is out of range for {len(self._items)} items")
        parts = {"tokens": [], "mask": [], "doc_ids": [], "positions": []}
        for d, c in enumerate(self._items[i].tolist()):
            start, n = int(self._starts[c]), int(self._lengths[c])
            parts["tokens"].append(self.shards.read(start, n))
            parts["mask"].append(self.shards.read_mask(start, n))
            parts["doc_ids"].append(np.full(n, d, dtype=np.int64))
            parts["positions"].append(np.arange(n, dtype=np.int64))
        return {k: np.concatenate(v) for k, v in parts.items()}


def collate_sft(items: list[dict], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """SFTDataset items -> int64 tensors, each (B, T) with T = seq_len (a fixed shape: memory and step time
    do not depend on the batch), right-padded:

    - input_ids: tokens[:-1] of each item, pad_id after it;
    - labels: tokens[1:] where that target's mask is 1 and it belongs to the same conversation as its input
      (the last token of a packed conversation is not trained to predict the next conversation's <bos>),
      IGNORE_INDEX elsewhere and on padding;
    - position_ids: the positions of the inputs (restarting per conversation), 0 on padding;
    - doc_ids: the conversation index of each input within its row, -1 on padding; give them to
      `model.masks.block_causal_mask` for attention that stays within each conversation.
    """
    B, T = len(items), seq_len
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    doc_ids = np.full((B, T), -1, dtype=np.int64)
    for b, item in enumerate(items):
        tokens, docs = item["tokens"], item["doc_ids"]
        n = len(tokens) - 1
        if n > T:
            raise ValueError(f"item {b} has {len(tokens)} tokens, more than seq_len + 1 = {T + 1}")
        if n < 1:
            continue
        input_ids[b, :n] = tokens[:-1]
        labels[b, :n] = _labels(tokens, item["mask"], docs[1:] == docs[:-1])
        position_ids[b, :n] = item["positions"][:-1]
        doc_ids[b, :n] = docs[:-1]
    return {k: torch.from_numpy(v) for k, v in
            (("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids), ("doc_ids", doc_ids))}


class DPODataset(torch.utils.data.Dataset):
    """Preference pairs from `prepare --stage dpo` shards: item i is pair i, documents 2i (prompt + chosen)
    and 2i + 1 (prompt + rejected), as a dict: "chosen_tokens", "rejected_tokens" (int64), "chosen_mask",
    "rejected_mask" (uint8, 1 on the response and its <|im_end|>) and "index" (i, for precomputed reference
    log-probs). Every document must fit seq_len inputs (seq_len + 1 tokens): prepare skips the pairs that
    do not fit its --seq-len, and a shorter seq_len here is an error rather than a silent cut."""

    def __init__(self, shards: TokenShards, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        require_stage(shards, "dpo")
        if shards.num_documents % 2:
            raise DataError(f"{shards.path} holds {shards.num_documents} documents, not whole (chosen, rejected) "
                            f"pairs; re-run `astrai-ds prepare --stage dpo` for it")
        self.shards, self.seq_len = shards, seq_len
        self._starts, self._lengths = shards.document_starts(), shards.document_lengths()
        if len(self._lengths) == 0:
            raise DataError(f"{shards.path} holds no preference pairs")
        longest = int(self._lengths.max())
        if longest - 1 > seq_len:
            raise DataError(
                f"{shards.path} holds pairs of up to {longest} tokens, which do not fit seq_len {seq_len} "
                f"({seq_len + 1} tokens); prepare the data again with --seq-len {seq_len} (pairs that do not fit "
                f"are skipped and counted) or raise data.seq_len to at least {longest - 1}")

    def __len__(self) -> int:
        return len(self._lengths) // 2

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} is out of range for {len(self)} pairs")
        item: dict = {"index": i}
        for side, d in (("chosen", 2 * i), ("rejected", 2 * i + 1)):
            start, n = int(self._starts[d]), int(self._lengths[d])
            item[f"{side}_tokens"] = self.shards.read(start, n)
            item[f"{side}_mask"] = self.shards.read_mask(start, n)
        return item


def collate_dpo(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """DPODataset items -> int64 tensors: "chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels", all (B, T) with one T for both sides (the longest input of the batch), so that chosen
    and rejected concatenate into one (2B, T) batch; and "index" (B,). Inputs are tokens[:-1] right-padded
    with pad_id; labels are tokens[1:] on the response (and its <|im_end|>), IGNORE_INDEX elsewhere and on
    padding. Right padding needs no attention mask or position ids behind causal attention."""
    B = len(items)
    T = max(len(item[f"{side}_tokens"]) - 1 for item in items for side in ("chosen", "rejected"))
    out = {}
    for side in ("chosen", "rejected"):
        input_ids = np.full((B, T), pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        for b, item in enumerate(items):
            tokens = item[f"{side}_tokens"]
            n = len(tokens) - 1
            input_ids[b, :n] = tokens[:-1]
            labels[b, :n] = _labels(tokens, item[f"{side}_mask"])
        out[f"{side}_input_ids"] = torch.from_numpy(input_ids)
        out[f"{side}_labels"] = torch.from_numpy(labels)
    out["index"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
    return out
