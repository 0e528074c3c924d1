"""Radix cache and page pool, without torch: random extends, commits, matches, rollbacks,
releases and evictions never leak or double-free a page and never hand out a wrong prefix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicepipe.llm.radix import OutOfPages, PagePool, PinnedSequence, RadixCache


class World:
    """A pool, its cache, live sequences and a fake KV store that records, per slot, the token
    prefix whose last token's KV it holds."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.pool = PagePool(num_pages, page_size)
        self.cache = RadixCache(self.pool)
        self.seqs: list[PinnedSequence] = []
        self.kv: dict[int, tuple[int, ...]] = {}

    def extend(self, seq: PinnedSequence, tokens: list[int]) -> bool:
        before = seq.tokens()
        try:
            slots = seq.extend(tokens)
        except OutOfPages:
            assert seq.tokens() == before
            return False
        full = before + tokens
        for i, slot in enumerate(slots):
            self.kv[slot] = tuple(full[: len(before) + i + 1])
        return True

    def check(self) -> None:
        pool, cache = self.pool, self.cache
        owners: dict[int, str] = {}
        holders = [0] * pool.num_pages
        for node in cache.nodes():
            assert len(node.tokens) == len(node.slots)
            if node.parent is not None:
                assert node.parent.children[node.tokens[0]] is node
                assert node.depth == node.parent.depth + len(node.tokens)
            for slot in node.slots:
                assert slot not in owners, "a slot is held twice"
                owners[slot] = "node"
            for page in pool.pages(node.slots):
                holders[page] += 1
        for seq in self.seqs:
            for slot in seq.tail_slots:
                assert slot not in owners, "a slot is held twice"
                owners[slot] = "tail"
            for page in pool.pages(seq.tail_slots):
                holders[page] += 1
            tokens = seq.tokens()
            assert len(seq.slots) == len(tokens) == seq.length
            for i, slot in enumerate(seq.slots):
                assert self.kv[slot] == tuple(tokens[: i + 1]), "wrong KV in a sequence's prefix"
        assert holders == [pool.holders(p) for p in range(pool.num_pages)]
        assert pool.free_pages == holders.count(0)
        # Each node's pin count is the number of sequences at or below it.
        pins = {id(n): 0 for n in cache.nodes()}
        for seq in self.seqs:
            node = seq.node
            while node is not None:
                pins[id(node)] += 1
                node = node.parent
        for node in cache.nodes():
            assert node.ref == pins[id(node)] + (1 if node is cache.root else 0)


tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(page_size=st.sampled_from([1, 2, 4, 16]), num_pages=st.integers(2, 24), data=st.data())
def test_random_operations_keep_the_books(page_size: int, num_pages: int, data: st.DataObject) -> None:
    w = World(num_pages, page_size)
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["new", "extend", "commit", "rollback", "release",
                                        "close", "evict", "match"]))
        if op == "new" or not w.seqs:
            query = data.draw(tokens_st)
            seq = PinnedSequence.matching(w.cache, query)
            assert query[: seq.length] == seq.tokens()
            w.seqs.append(seq)
            w.extend(seq, query[seq.length:])
        else:
            seq = data.draw(st.sampled_from(w.seqs))
            if op == "extend":
                w.extend(seq, data.draw(tokens_st))
            elif op == "commit":
                seq.commit()
            elif op == "rollback":
                seq.rollback(data.draw(st.integers(0, seq.length)))
            elif op == "release":
                seq.release()
            elif op == "close":
                seq.release()
                w.cache.unpin(seq.node)
                w.seqs.remove(seq)
            elif op == "evict":
                w.cache.evict(num_pages)
            elif op == "match":
                query = data.draw(tokens_st)
                node, n = w.cache.match_prefix(query)
                assert w.cache.path_tokens(node) == query[:n]
                assert n == len(query) or query[n] not in node.children
        w.check()
    for seq in w.seqs:
        seq.release()
        w.cache.unpin(seq.node)
    w.seqs.clear()
    w.cache.evict(num_pages)
    w.check()
    assert w.pool.free_pages == num_pages and len(w.cache.nodes()) == 1


def test_a_shared_system_prompt_is_stored_once() -> None:
    w = World(64, 4)
    system = list(range(10))
    a = PinnedSequence.matching(w.cache, system)
    w.extend(a, system)
    a.commit()
    b = PinnedSequence.matching(w.cache, system + [50, 51])
    w.seqs += [a, b]
    assert b.length == 10 and b.slots == a.slots
    w.extend(b, [50, 51])
    # The last page of the prompt still has room and nobody wrote past it: b continues there.
    assert b.slots[:10] == a.slots[:10] and w.pool.free_pages == 64 - 3
    w.check()


def test_rollback_frees_the_pages_after_the_boundary_and_reuses_them() -> None:
    w = World(8, 4)
    s = PinnedSequence(w.cache)
    w.seqs.append(s)
    w.extend(s, list(range(10)))
    s.commit()
    w.extend(s, list(range(10, 20)))
    assert w.pool.free_pages == 3
    s.rollback(6)  # inside the committed node
    assert s.tokens() == list(range(6)) and w.pool.free_pages == 6
    w.extend(s, [99, 98])  # continues in the page of position 5
    assert s.slots[6] == s.slots[5] + 1
    w.check()


def test_out_of_pages_changes_nothing_and_evicts_only_unreferenced_leaves() -> None:
    w = World(4, 2)
    a = PinnedSequence(w.cache)
    w.extend(a, [1, 2, 3, 4])
    a.commit()
    b = PinnedSequence(w.cache)
    w.seqs += [a, b]
    assert w.extend(b, [7, 8, 9, 10])
    assert not w.extend(b, [11])  # a's pinned node may not be evicted
    a.release()
    assert w.extend(b, [11])  # now it may
    assert w.cache.match_prefix([1, 2])[1] == 0
    w.check()


def test_pool_refuses_a_bad_size() -> None:
    with pytest.raises(ValueError):
        PagePool(0)
