"""The block manager of the paged KV cache: which blocks of the pool each sequence owns, and which full blocks
hold a known prefix so that a later request can reuse them (vLLM's prefix caching, nano-vllm's BlockManager).

Pure bookkeeping, no tensors. The pool is `num_blocks` blocks of `block_size` token slots; token `position` of
a sequence lives in slot `block_table[position // block_size] * block_size + position % block_size` of the
K/V tensors the model runner owns. A full block whose K/V is written is named by a chained hash of (its
parent's hash, its token ids), so two sequences that start alike share the same physical blocks (ref counts).
The hash is SHA-256, so a key names its whole prefix: a collision cannot be built the way Python's `hash` of a
tuple (the same in every run) can be made to collide (vLLM's CVE-2025-25183). A hit is still verified against
the block's own tokens and its parent's key, so even a collision could not put a block at another position or
behind another context.

A block whose ref count drops to 0 joins the free queue but keeps its hash: a later request can still hit it
until an allocation takes it, which drops the hash (LRU: freed blocks go to the back, allocation takes from the
front; a sequence is freed tail-first, so the head of a shared prefix stays cached longest).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_ROOT = b""  # parent hash of a sequence's first block


def _block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """Chained hash of one full block: SHA-256 of its parent's hash and its token ids (as 64-bit integers); a
    module function so tests can force collisions."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass
class Block:
    id: int
    ref: int = 0  # number of block tables that hold this block
    hash: bytes | None = None  # chained hash once the block is full and its K/V written; None while writable
    tokens: tuple[int, ...] | None = None  # (block_size,) token ids behind `hash`, to verify hits
    parent: bytes | None = None  # the hash of the block before it in its sequence (_ROOT for a first block)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ref-0 block ids in eviction order (front = evicted first); an OrderedDict so that a prefix hit can
        # take a cached block out of the middle in O(1).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chained hash -> block id (the first block registered with it)
        self.stats = {"prefix_query_tokens": 0, "prefix_hit_tokens": 0, "evictions": 0}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached ones included (they are evictable)."""
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], count: bool = True) -> tuple[list[int], int]:
        """(block ids, number of tokens they hold) of the longest chain of cached full blocks that starts
        `token_ids`. At most (len - 1) // block_size blocks, so the last token is always computed (its logits
        are needed). Ref counts are unchanged: pass the ids to `allocate` before any other allocation. `count`:
        add the lookup to the hit-rate statistics now (the scheduler counts it once the request is admitted)."""
        bs, parent, hit = self.block_size, _ROOT, []
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h = _block_hash(parent, tokens)
            bid = self._cached.get(h)
            # a miss, or a collision: the block must hold these tokens behind this same prefix
            if bid is None or self.blocks[bid].tokens != tokens or self.blocks[bid].parent != parent:
                break
            hit.append(bid)
            parent = h
        if count:
            self.record_lookup(len(token_ids), len(hit) * bs)
        return hit, len(hit) * bs

    def next_block_key(self, token_ids: list[int], hit: list[int]) -> bytes | None:
        """The chained key of the first full block after the `hit` blocks `match_prefix` found (None when no
        full block that `match_prefix` would look at follows): the block a sequence computes next, and hits
        once it is cached."""
        bs, n = self.block_size, len(hit)
        if n >= (len(token_ids) - 1) // bs:
            return None
        return _block_hash(self.blocks[hit[-1]].hash if hit else _ROOT, tuple(token_ids[n * bs:(n + 1) * bs]))

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.stats["prefix_query_tokens"] += query_tokens
        self.stats["prefix_hit_tokens"] += hit_tokens

    def cache_blocks(self, block_table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Register the hash of every full block among the first `num_computed` tokens of a sequence
        (`token_ids`: its prompt + output so far) that is not hashed yet. Hashed blocks always form a head of
        the table, so the scan walks back from the last full block and stops at the first hashed one: O(1)
        per decode step."""
        bs = self.block_size
        n_full = min(num_computed, len(token_ids)) // bs
        if n_full > len(block_table):
            raise ValueError(f"{n_full} full blocks computed but the table holds {len(block_table)}")
        start = n_full
        while start > 0 and self.blocks[block_table[start - 1]].hash is None:
            start -= 1
        for i in range(start, n_full):
            block = self.blocks[block_table[i]]
            parent = self.blocks[block_table[i - 1]].hash if i else _ROOT
            block.tokens, block.parent = tuple(token_ids[i * bs:(i + 1) * bs]), parent
            block.hash = _block_hash(parent, block.tokens)
            # Another block may hold the same prefix (two sequences computed it at once): keep the first one;
            # this one still carries the hash so its successors can chain on it.
            self._cached.setdefault(block.hash, block.id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after a weight change): nothing can be hit afterwards. Blocks in use
        keep their hash as the chain state of their sequence, so call this with no sequence running if their
        later blocks must not be registered either."""
        self._cached.clear()
        for bid in self._free:
            self.blocks[bid].hash = self.blocks[bid].tokens = self.blocks[bid].parent = None

    def _is_registered(self, block: Block) -> bool:
        return block.hash is not None and self._cached.get(block.hash) == block.id

    # ---- allocation ---------------------------------------------------------------------------------------

    def _plan(self, block_table: list[int], num_tokens: int, prefix_blocks) -> tuple[int, int]:
        """(fresh blocks to take, free blocks consumed in all) to make the table cover `num_tokens` slots."""
        if prefix_blocks and block_table:
            raise ValueError("prefix_blocks can only start an empty block table")
        for bid in prefix_blocks:
            if not self._is_registered(self.blocks[bid]):
                raise ValueError(f"prefix block {bid} is no longer cached: call allocate right after match_prefix")
        fresh = max(0, self.blocks_needed(num_tokens) - len(block_table) - len(prefix_blocks))
        return fresh, fresh + sum(self.blocks[bid].ref == 0 for bid in prefix_blocks)

    def allocate(self, block_table: list[int], num_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Make `block_table` (mutated in place) cover `num_tokens` token slots: the cached `prefix_blocks`
        first (empty table only), then fresh blocks from the front of the free queue. All or nothing: False,
        with nothing changed, when the pool is short."""
        fresh, consumed = self._plan(block_table, num_tokens, prefix_blocks)
        if consumed > len(self._free):
            return False
        for bid in prefix_blocks:
            block = self.blocks[bid]
            if block.ref == 0:
                del self._free[bid]
            block.ref += 1
            block_table.append(bid)
        for _ in range(fresh):
            bid, _ = self._free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:  # evict: the block will be overwritten
                if self._cached.get(block.hash) == bid:
                    del self._cached[block.hash]
                    self.stats["evictions"] += 1
                block.hash = block.tokens = block.parent = None
            block.ref = 1
            block_table.append(bid)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop the table's reference to each of its blocks, tail first, and clear it. A block left unused joins
        the free queue: at the back if it holds a cached prefix, at the front (evicted first) if it does not."""
        counts: dict[int, int] = {}
        for bid in block_table:
            counts[bid] = counts.get(bid, 0) + 1
        for bid, n in counts.items():  # check everything first, so an error changes nothing
            if not 0 <= bid < self.num_blocks or self.blocks[bid].ref < n:
                raise ValueError(f"block {bid} freed more often than it is held")
        for bid in reversed(block_table):
            block = self.blocks[bid]
            block.ref -= 1
            if block.ref == 0:
                self._free[bid] = None
                if not self._is_registered(block):  # can never be hit: reuse it before any cached block
                    block.hash = block.tokens = block.parent = None
                    self._free.move_to_end(bid, last=False)
        block_table.clear()
