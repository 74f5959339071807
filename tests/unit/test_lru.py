"""The one LRU (`trimodal.lru.Lru`): a bound on the summed sizes (a count when every size is 1), least recently used
evicted first, hits and misses counted by `get` only, and `add` + `evict(keep)` for a caller that must hold a whole
batch's entries at once."""

import pytest

from trimodal.lru import Lru, LruStats


def test_a_count_bound_evicts_the_least_recently_used_and_get_refreshes():
    evicted = []
    lru: Lru[str, int] = Lru(2, on_evict=lambda key, value: evicted.append((key, value)))
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recently used: b is the oldest
    lru.put("c", 3)
    assert lru.keys() == ["a", "c"] and lru.values() == [1, 3] and evicted == [("b", 2)]
    assert lru.stats == LruStats(hits=1, misses=0, evictions=1, entries=2, size=2)


def test_looking_with_in_and_len_neither_counts_nor_refreshes():
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert "a" in lru and "z" not in lru and len(lru) == 2
    lru.put("c", 3)
    assert lru.keys() == ["b", "c"]  # `in` did not make a the most recently used
    assert (lru.stats.hits, lru.stats.misses) == (0, 0)
    assert lru.get("a") is None and lru.stats.misses == 1


def test_sizes_bound_the_sum_and_evict_as_many_as_needed_oldest_first():
    lru: Lru[str, str] = Lru(300)
    for key, size in (("a", 100), ("b", 100), ("c", 100)):
        lru.put(key, key.upper(), size)
    lru.put("d", "D", 250)  # needs a, b and c gone (50 + 250 > 300 with c left)
    assert lru.keys() == ["d"] and lru.stats.size == 250 and lru.stats.evictions == 3


def test_replacing_a_key_counts_its_size_once_and_makes_it_the_most_recent():
    lru: Lru[str, int] = Lru(300)
    lru.put("a", 1, 100)
    lru.put("b", 2, 100)
    lru.put("a", 3, 150)
    assert lru.keys() == ["b", "a"] and lru.get("a") == 3
    assert lru.stats.size == 250 and lru.stats.entries == 2 and lru.stats.evictions == 0


def test_a_value_over_the_whole_bound_is_not_stored_and_the_old_entry_stays():
    lru: Lru[str, str] = Lru(100)
    lru.put("a", "small", 50)
    lru.put("a", "huge", 101)
    lru.put("b", "huge", 101)
    assert lru.get("a") == "small" and "b" not in lru and lru.stats.evictions == 0


def test_add_holds_past_the_bound_until_evict_which_spares_the_kept_keys():
    evicted = []
    lru: Lru[str, int] = Lru(1, on_evict=lambda key, value: evicted.append(key))
    for key in "abc":
        lru.add(key, 0)
    assert len(lru) == 3 and evicted == []  # add never evicts
    lru.evict(keep={"a", "c"})  # a is the oldest but kept: b goes, and the kept two stay over the bound
    assert lru.keys() == ["a", "c"] and evicted == ["b"]
    lru.evict()
    assert lru.keys() == ["c"] and evicted == ["b", "a"] and lru.stats.evictions == 2


def test_capacity_zero_keeps_nothing_and_a_negative_one_is_refused():
    lru: Lru[str, int] = Lru(0)
    lru.put("a", 1)
    assert len(lru) == 0 and lru.get("a") is None and lru.stats.entries == 0
    with pytest.raises(ValueError, match="capacity"):
        Lru(-1)
