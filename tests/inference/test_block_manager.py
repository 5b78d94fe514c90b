"""The paged KV cache's block manager: accounting, slots, prefix reuse, LRU eviction, collisions, and a random
stress test that checks the invariants and the cached content after every operation."""

import random

import pytest

from astrai_ds.inference import block_manager as bm_module
from astrai_ds.inference.block_manager import BlockManager


def check_invariants(bm: BlockManager, tables: list[list[int]]) -> None:
    """Ref counts equal the table references; free + used = pool; the registry points at hashed blocks; a
    block being written (unhashed) belongs to one table at most."""
    held = [0] * bm.num_blocks
    for table in tables:
        for bid in table:
            held[bid] += 1
    assert [b.ref for b in bm.blocks] == held
    assert set(bm._free) == {b.id for b in bm.blocks if b.ref == 0}
    assert bm.num_free_blocks + sum(b.ref > 0 for b in bm.blocks) == bm.num_blocks
    for h, bid in bm._cached.items():
        assert bm.blocks[bid].hash == h and len(bm.blocks[bid].tokens) == bm.block_size
    for b in bm.blocks:
        assert (b.hash is None) == (b.tokens is None) == (b.parent is None)
        assert b.hash is not None or b.ref <= 1


def test_allocation_and_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a, b = [], []
    assert bm.allocate(a, 5) and len(a) == 2 and bm.num_free_blocks == 6
    assert bm.allocate(a, 8) and len(a) == 2  # still fits: nothing taken
    assert bm.allocate(a, 9) and len(a) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(b, 1) and len(b) == 1 and bm.num_free_blocks == 4
    assert len(set(a + b)) == 4
    check_invariants(bm, [a, b])
    bm.free(a)
    assert a == [] and bm.num_free_blocks == 7
    check_invariants(bm, [b])
    with pytest.raises(ValueError):  # freeing the same block twice
        bm.free(list(b) * 2)
    assert bm.blocks[b[0]].ref == 1  # the failed free changed nothing
    stale = list(b)
    bm.free(b)
    with pytest.raises(ValueError):
        bm.free(stale)
    check_invariants(bm, [])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = [], []
    assert bm.allocate(a, 5)  # 3 blocks
    assert not bm.allocate(b, 3)
    assert b == [] and bm.num_free_blocks == 1
    assert not bm.allocate(a, 9) and len(a) == 3  # a table that grows is all or nothing too
    assert bm.allocate(a, 8) and len(a) == 4 and bm.num_free_blocks == 0
    check_invariants(bm, [a, b])


def slot(bm: BlockManager, block_table: list[int], position: int) -> int:
    """The pool slot of token `position` of a table (the model runner's arithmetic), for a pool simulated here."""
    assert 0 <= position < len(block_table) * bm.block_size
    return block_table[position // bm.block_size] * bm.block_size + position % bm.block_size


def test_prefix_match_counts_full_blocks_and_never_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10, 20))  # 10 tokens: 2 full blocks + 2
    table = []
    assert bm.match_prefix(prompt) == ([], 0)  # empty cache
    bm.allocate(table, len(prompt))
    bm.cache_blocks(table, prompt, 6)  # only the first block is full and computed
    assert bm.blocks[table[1]].hash is None
    assert bm.match_prefix(prompt) == (table[:1], 4)
    bm.cache_blocks(table, prompt, 10)
    assert bm.blocks[table[2]].hash is None  # the partial tail block is never hashed
    assert bm.match_prefix(prompt) == (table[:2], 8)
    assert bm.match_prefix(prompt[:8]) == (table[:1], 4)  # never the whole prompt
    assert bm.match_prefix(prompt[:9]) == (table[:2], 8)
    assert bm.match_prefix(prompt[:4] + [0] * 6) == (table[:1], 4)  # diverges in block 2
    assert bm.match_prefix([0] + prompt[1:]) == ([], 0)  # a chain: block 2 alone is not a hit
    assert bm.stats["prefix_hit_tokens"] == 4 + 8 + 4 + 8 + 4


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=6, block_size=4)
    a_prompt, b_prompt = list(range(9)), list(range(8)) + [99, 98]
    a = []
    bm.allocate(a, len(a_prompt))
    bm.cache_blocks(a, a_prompt, len(a_prompt))
    prefix, n = bm.match_prefix(b_prompt)
    assert prefix == a[:2] and n == 8
    b = []
    assert bm.allocate(b, len(b_prompt), prefix)
    assert b[:2] == a[:2] and b[2] != a[2] and bm.num_free_blocks == 2
    assert [bm.blocks[i].ref for i in a] == [2, 2, 1]
    check_invariants(bm, [a, b])
    bm.free(a)  # must not free the shared blocks under b
    assert [bm.blocks[i].ref for i in b] == [1, 1, 1] and bm.num_free_blocks == 3
    check_invariants(bm, [b])
    c = []
    assert bm.allocate(c, 3 * 4) and not set(c) & set(b)
    assert bm.match_prefix(a_prompt) == (b[:2], 8)
    bm.free(b), bm.free(c)
    check_invariants(bm, [])
    with pytest.raises(ValueError):  # prefix blocks only start an empty table
        bm.allocate([0], 8, [1])


def test_freed_cached_blocks_are_hit_then_evicted_lru_head_last():
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]  # blocks 0, 1 full, block 2 partial
    a = []
    bm.allocate(a, 5)
    assert a == [0, 1, 2]
    bm.cache_blocks(a, prompt, 5)
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert list(bm._free) == [2, 3, 1, 0]  # partial block first, then unused, then the prefix tail-first
    assert bm.match_prefix(prompt) == ([0, 1], 4)  # still cached after the free
    b = []
    assert bm.allocate(b, 5, [0, 1]) and b == [0, 1, 2]  # the hit blocks leave the free queue
    assert bm.num_free_blocks == 1 and bm.stats["evictions"] == 0
    bm.free(b)
    c = []
    assert bm.allocate(c, 6)  # takes 2, 3, then evicts the prefix's tail block 1
    assert c == [2, 3, 1] and bm.stats["evictions"] == 1
    assert bm.match_prefix(prompt) == ([0], 2)  # the head block outlives the tail
    d = []
    assert bm.allocate(d, 2) and d == [0] and bm.stats["evictions"] == 2
    assert bm.match_prefix(prompt) == ([], 0)
    check_invariants(bm, [c, d])


def test_stale_prefix_blocks_are_refused():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = []
    bm.allocate(a, 2)
    bm.cache_blocks(a, [7, 8], 2)
    bm.free(a)
    prefix, _ = bm.match_prefix([7, 8, 9])
    b = []
    bm.allocate(b, 4)  # another allocation evicts the matched block before it is taken
    with pytest.raises(ValueError):
        bm.allocate([], 3, prefix)


def test_hash_collisions_give_no_false_hit(monkeypatch):
    monkeypatch.setattr(bm_module, "_block_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(12))
    a = []
    bm.allocate(a, 13)
    bm.cache_blocks(a, prompt + [0], 13)
    assert bm._cached == {42: a[0]}  # the first block keeps the entry
    assert bm.match_prefix([9, 9, 9, 9, 9]) == ([], 0)  # same hash, other tokens
    assert bm.match_prefix(prompt + [0]) == (a[:1], 4)  # block 2's hash points at block 1's tokens
    check_invariants(bm, [a])


def test_a_forced_collision_cannot_reuse_a_block_behind_another_prefix(monkeypatch):
    """A block's key covers its tokens only (the collision): a repeat of the first block's tokens later in the
    prompt finds the first block, whose parent is another; it must not be reused there."""
    monkeypatch.setattr(bm_module, "_block_hash", lambda parent, tokens: hash(tokens))
    bm = BlockManager(num_blocks=8, block_size=4)
    a = []
    bm.allocate(a, 9)
    bm.cache_blocks(a, [0, 1, 2, 3, 0, 1, 2, 3, 9], 9)
    assert bm.match_prefix([0, 1, 2, 3, 0, 1, 2, 3, 9]) == (a[:1], 4)  # not (a[0], a[0]): 8 tokens
    check_invariants(bm, [a])


def test_block_keys_chain_a_cryptographic_hash():
    """The key of a block is SHA-256 over its parent's key and its tokens: the same tokens behind another prefix
    give another key, and the keys are the same in every process (no per-run salt to rely on)."""
    import hashlib
    from array import array

    first = bm_module._block_hash(bm_module._ROOT, (0, 1, 2, 3))
    assert first == hashlib.sha256(array("q", (0, 1, 2, 3)).tobytes()).digest()
    assert bm_module._block_hash(first, (0, 1, 2, 3)) not in (first, bm_module._block_hash(first, (0, 1, 2, 4)))


def test_duplicate_blocks_keep_the_first_entry():
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [5, 6, 7]
    a, b = [], []
    bm.allocate(a, 3), bm.allocate(b, 3)  # both computed the same prefix at once, without a hit
    bm.cache_blocks(a, prompt, 3), bm.cache_blocks(b, prompt, 3)
    assert (a, b) == ([0, 1], [2, 3]) and bm.blocks[2].hash == bm.blocks[0].hash
    assert bm.match_prefix(prompt) == ([0], 2)
    bm.free(b)  # b's duplicate can never be hit: it goes first in the queue, its hash dropped
    assert b == [] and list(bm._free) == [2, 3] and bm.blocks[2].hash is None
    assert bm.match_prefix(prompt) == ([0], 2)
    check_invariants(bm, [a])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=6, block_size=2)
    p, q = [1, 2, 3], [4, 5, 6]
    a, b = [], []
    bm.allocate(a, 3), bm.allocate(b, 3)
    bm.cache_blocks(a, p, 3), bm.cache_blocks(b, q, 3)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(p) == ([], 0) and bm.match_prefix(q) == ([], 0)
    assert all(bm.blocks[i].hash is None for i in bm._free)
    b_tokens = q + [7, 8]
    bm.allocate(b, 5)
    bm.cache_blocks(b, b_tokens, 5)  # b keeps chaining; its new block is registered
    assert bm.match_prefix(b_tokens) == ([], 0)  # b's first block was forgotten, so the chain breaks
    check_invariants(bm, [b])
    bm.free(b)
    check_invariants(bm, [])


@pytest.mark.parametrize("seed", range(6))
def test_random_stress(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.choice([6, 12, 24]), block_size=rng.choice([1, 2, 4]))
    pool = [None] * (bm.num_blocks * bm.block_size)  # stands in for the K/V tensors: the token in each slot
    heads = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    seqs: list[tuple[list[int], list[int]]] = []  # (block table, token ids); all tokens computed

    def write(table, tokens, start):
        for pos in range(start, len(tokens)):
            pool[slot(bm, table, pos)] = tokens[pos]
        bm.cache_blocks(table, tokens, len(tokens))

    hits = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35:  # a new request, often starting with a shared head
            tokens = rng.choice(heads)[:] if rng.random() < 0.7 else []
            tokens += [rng.randrange(5) for _ in range(rng.randrange(1, 8))]
            prefix, n = bm.match_prefix(tokens)
            assert n < len(tokens) and n == len(prefix) * bm.block_size
            # a hit holds exactly the prompt's tokens in the pool
            assert [pool[slot(bm, prefix, p)] for p in range(n)] == tokens[:n]
            hits += n
            free_before, table = bm.num_free_blocks, []
            if bm.allocate(table, len(tokens), prefix):
                write(table, tokens, n)
                seqs.append((table, tokens))
            else:
                assert table == [] and bm.num_free_blocks == free_before
        elif op < 0.8 and seqs:  # a decode step; preempt (free) when the pool is short
            table, tokens = rng.choice(seqs)
            tokens.append(rng.randrange(5))
            if bm.allocate(table, len(tokens)):
                write(table, tokens, len(tokens) - 1)
            else:
                bm.free(table)
                seqs.remove((table, tokens))
        elif seqs:
            table, tokens = seqs.pop(rng.randrange(len(seqs)))
            bm.free(table)
        elif rng.random() < 0.05:
            bm.reset_prefix_cache()
        check_invariants(bm, [t for t, _ in seqs])
        for table, tokens in seqs:  # every live sequence still reads its own tokens
            assert [pool[slot(bm, table, p)] for p in range(len(tokens))] == tokens
    for table, _ in seqs:
        bm.free(table)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
    assert hits > 0 and bm.stats["prefix_hit_tokens"] == hits
