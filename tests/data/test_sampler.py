import pytest

from astrai_ds.data.sampler import DistributedBatchSampler
from astrai_ds.errors import DataError


def _ranks(n=50, mbs=4, world=3, seed=7, shuffle=True):
    return [DistributedBatchSampler(n, mbs, r, world, seed, shuffle) for r in range(world)]


def test_ranks_disjoint_and_cover_the_epoch():
    samplers = _ranks()
    steps = samplers[0].steps_per_epoch  # 50 // 12 = 4
    seen = []
    for _ in range(steps):
        batches = [s.next_indices() for s in samplers]
        assert all(len(b) == 4 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat)
        seen += flat
    assert len(set(seen)) == 48 and set(seen) <= set(range(50))
    # The next global step starts a new epoch with a new permutation.
    assert samplers[0].epoch == 0
    samplers[0].next_indices()
    assert samplers[0].epoch == 1 and samplers[0].consumed_total == 48 + 12


def test_no_shuffle_is_sequential():
    a, b = _ranks(n=16, mbs=2, world=2, shuffle=False)
    assert [a.next_indices(), b.next_indices(), a.next_indices(), b.next_indices()] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_epochs_use_different_permutations():
    (s,) = _ranks(n=20, mbs=5, world=1)
    first = [s.next_indices() for _ in range(4)]
    second = [s.next_indices() for _ in range(4)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(20))
    assert first != second


def test_resume_equals_uninterrupted():
    ref = _ranks(n=50, mbs=4, world=3, seed=3)
    expected = [[s.next_indices() for s in ref] for _ in range(11)]  # crosses two epoch boundaries
    run = _ranks(n=50, mbs=4, world=3, seed=3)
    got = [[s.next_indices() for s in run] for _ in range(6)]
    state = run[1].state_dict()
    assert state == {"seed": 3, "epoch": 1, "consumed": 24, "num_samples": 50, "world_size": 3, "micro_batch_size": 4}
    resumed = _ranks(n=50, mbs=4, world=3, seed=999)
    for s in resumed:
        s.load_state_dict(state)
    got += [[s.next_indices() for s in resumed] for _ in range(5)]
    assert got == expected


def test_seeds_differ():
    a = DistributedBatchSampler(100, 10, 0, 1, seed=0)
    b = DistributedBatchSampler(100, 10, 0, 1, seed=1)
    assert [a.next_indices() for _ in range(3)] != [b.next_indices() for _ in range(3)]


def test_errors():
    with pytest.raises(DataError, match="fewer than one global micro-step"):
        DistributedBatchSampler(10, 4, 0, 3, seed=0)
    s = DistributedBatchSampler(100, 4, 0, 2, seed=0)
    state = s.state_dict()
    other = DistributedBatchSampler(101, 4, 0, 2, seed=0)
    with pytest.raises(DataError, match="data or seq_len changed"):
        other.load_state_dict(state)
