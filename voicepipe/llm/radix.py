"""KV page pool and radix cache over token ids: pure Python, no torch.

The KV of one token lives in one *slot* of a pool tensor; slots are grouped in pages of
`page_size` consecutive slots, and pages are what the pool hands out and takes back. A sequence's
slots need not be contiguous, so matching and rollback are exact to the token: a sequence that
diverges in the middle of a page simply continues in a fresh page (at most `page_size - 1` slots
of the shared page stay unused until it is freed).

`RadixCache` maps every cached token prefix to the slots holding its KV. Each node stores the
edge `tokens` from its parent and their `slots`; `ref` counts the handles pinned at the node or
below it, and a leaf whose `ref` is zero may be evicted, least recently used first. A page is
returned to the pool when no node and no uncommitted tail holds any of its slots any more (the
pool counts holders per page).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


class OutOfPages(Exception):
    """The pool has no free page left, even after evicting every unreferenced leaf."""


class PagePool:
    """Free list of pages of `page_size` slots and, per page, the number of holders of its slots.

    A holder is a radix node or a sequence's uncommitted tail; `retain`/`release` take one
    holder's set of pages. `alloc_slot` continues the page of the previous slot while that page
    has unused room at its end and nobody wrote past it, else starts a new page.
    """

    def __init__(self, num_pages: int, page_size: int = 16) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError("a pool needs at least one page of at least one slot")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._holders = [0] * num_pages
        self._used = [0] * num_pages  # slots handed out from the page, from its start

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages(self, slots: Sequence[int]) -> set[int]:
        p = self.page_size
        return {s // p for s in slots}

    def retain(self, pages: set[int]) -> None:
        for page in pages:
            self._holders[page] += 1

    def release(self, pages: set[int]) -> None:
        for page in pages:
            self._holders[page] -= 1
            if self._holders[page] < 0:
                raise AssertionError(f"page {page} released more often than retained")
            if self._holders[page] == 0:
                self._used[page] = 0
                self._free.append(page)

    def new_page(self) -> int:
        """A fresh page with no holder yet; the caller retains it."""
        if not self._free:
            raise OutOfPages
        return self._free.pop()

    def next_slot(self, last: int | None) -> int | None:
        """The slot right after `last` if it is still unused in the same page, else None."""
        if last is None:
            return None
        page, offset = divmod(last, self.page_size)
        if offset + 1 < self.page_size and self._used[page] == offset + 1:
            return last + 1
        return None

    def take(self, slot: int) -> None:
        """Mark `slot` used; slots of a page are taken in order."""
        page, offset = divmod(slot, self.page_size)
        if self._used[page] != offset:
            raise AssertionError(f"slot {slot} taken out of order")
        self._used[page] = offset + 1

    def give_back_tail(self, slots: Sequence[int]) -> None:
        """Make `slots` (the newest slots of their pages) reusable by the next `next_slot`."""
        for slot in reversed(slots):
            page, offset = divmod(slot, self.page_size)
            if self._used[page] == offset + 1:
                self._used[page] = offset

    def holders(self, page: int) -> int:
        return self._holders[page]


_clock = itertools.count()


@dataclass(eq=False)
class Node:
    tokens: list[int]
    slots: list[int]
    parent: Node | None
    depth: int  # tokens from the root to the end of this node
    children: dict[int, Node] = field(default_factory=dict)
    ref: int = 0
    last_access: int = 0

    @property
    def start(self) -> int:
        return self.depth - len(self.tokens)


class RadixCache:
    """Cached token prefixes and their slots, shared by all sequences of one pool.

    Handles are nodes: `pin(node)` keeps the path root..node from eviction until `unpin(node)`.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.root = Node([], [], None, 0)
        self.root.ref = 1  # never evicted

    # --- lookup -------------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> tuple[Node, int]:
        """The deepest node whose path is a prefix of `tokens`, splitting a node when the match
        ends inside it, and the matched length (== node.depth)."""
        node, i = self.root, 0
        now = next(_clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.tokens, tokens, i)
            child.last_access = now
            if n < len(child.tokens):
                node = self._split(child, n)
                i += n
                break
            node, i = child, i + n
        return node, i

    def slots(self, node: Node) -> list[int]:
        """Slots of the path root..node, in token order."""
        parts = []
        while node.parent is not None:
            parts.append(node.slots)
            node = node.parent
        return [s for part in reversed(parts) for s in part]

    def slots_between(self, node: Node, start: int) -> list[int]:
        """Slots of positions [start, node.depth) of the path root..node."""
        parts = []
        while node.parent is not None and node.depth > start:
            parts.append(node.slots[max(0, start - node.start):])
            node = node.parent
        return [s for part in reversed(parts) for s in part]

    def path_tokens(self, node: Node) -> list[int]:
        parts = []
        while node.parent is not None:
            parts.append(node.tokens)
            node = node.parent
        return [t for part in reversed(parts) for t in part]

    # --- insertion ----------------------------------------------------------------------------

    def insert(self, node: Node, tokens: Sequence[int], slots: Sequence[int]) -> tuple[Node, list[int]]:
        """Add `tokens` (with their `slots`) below `node` and return the node that ends them and
        the slots that turned out to duplicate an existing node's (the caller frees those).

        The caller's hold on `slots` passes to the tree: it must release its own hold on their
        pages after this call (see `Sequence.commit` in the engine).
        """
        if len(tokens) != len(slots):
            raise ValueError("one slot per token")
        now = next(_clock)
        i = 0
        duplicates: list[int] = []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                new = Node(list(tokens[i:]), list(slots[i:]), node, node.depth + len(tokens) - i,
                           last_access=now)
                self.pool.retain(self.pool.pages(new.slots))
                node.children[tokens[i]] = new
                return new, duplicates
            n = _common(child.tokens, tokens, i)
            if n < len(child.tokens):
                child = self._split(child, n)
            duplicates.extend(slots[i : i + n])
            child.last_access = now
            node, i = child, i + n
        return node, duplicates

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child` after its first n tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.tokens)
        upper = Node(child.tokens[:n], child.slots[:n], parent, child.start + n,
                     ref=child.ref, last_access=child.last_access)
        upper.children[child.tokens[n]] = child
        parent.children[child.tokens[0]] = upper
        # Both halves hold the pages they touch; the page at the cut may be held by both.
        self.pool.retain(self.pool.pages(upper.slots))
        old = self.pool.pages(child.slots)
        child.tokens = child.tokens[n:]
        child.slots = child.slots[n:]
        child.parent = upper
        self.pool.release(old - self.pool.pages(child.slots))
        return upper

    # --- references ---------------------------------------------------------------------------

    def pin(self, node: Node) -> None:
        now = next(_clock)
        while node is not None:
            node.ref += 1
            node.last_access = now
            node = node.parent  # type: ignore[assignment]

    def unpin(self, node: Node) -> None:
        while node is not None:
            node.ref -= 1
            if node.ref < 0:
                raise AssertionError("node unpinned more often than pinned")
            node = node.parent  # type: ignore[assignment]

    def node_at(self, node: Node, length: int) -> Node:
        """The node ending exactly `length` tokens into the path root..node (splitting one)."""
        if not 0 <= length <= node.depth:
            raise ValueError(f"{length} is not within the path's {node.depth} tokens")
        while node.start >= length and node.parent is not None:
            node = node.parent
        if node.depth == length:
            return node
        return self._split(node, length - node.start)

    # --- eviction -----------------------------------------------------------------------------

    def evict(self, pages: int) -> int:
        """Remove unreferenced leaves, least recently used first, until `pages` pages are free
        (or nothing is left to evict). Returns the number of free pages."""
        if self.pool.free_pages >= pages:
            return self.pool.free_pages
        leaves = sorted(self._evictable(), key=lambda n: n.last_access)
        while leaves and self.pool.free_pages < pages:
            node = leaves.pop(0)
            parent = self._remove(node)
            if parent is not self.root and not parent.children and parent.ref == 0:
                # The parent became a leaf: it goes in the order it was last used.
                j = 0
                while j < len(leaves) and leaves[j].last_access <= parent.last_access:
                    j += 1
                leaves.insert(j, parent)
        return self.pool.free_pages

    def drop_unreferenced(self, node: Node) -> None:
        """Remove `node` and its unreferenced ancestors while each is an unreferenced leaf
        (freeing a rolled-back branch at once rather than waiting for eviction)."""
        while node is not self.root and not node.children and node.ref == 0:
            node = self._remove(node)

    def _remove(self, node: Node) -> Node:
        parent = node.parent
        assert parent is not None and not node.children and node.ref == 0
        del parent.children[node.tokens[0]]
        self.pool.give_back_tail(node.slots)
        self.pool.release(self.pool.pages(node.slots))
        node.parent = None
        return parent

    def _evictable(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.ref == 0:
                out.append(node)
        return out

    def nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def cached_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.nodes())


class PinnedSequence:
    """One sequence's KV: a pinned radix node (its committed prefix) plus an uncommitted tail.

    Index arithmetic: positions [0, node.depth) are the committed prefix, whose slots are the
    path's; positions [node.depth, length) are the tail, held by this sequence alone. `extend`
    allocates slots for new tokens at the end, `commit` moves the tail into the tree,
    `rollback(n)` keeps positions [0, n) and frees everything after.
    """

    def __init__(self, cache: RadixCache, node: Node | None = None) -> None:
        self.cache = cache
        self.node = node or cache.root
        cache.pin(self.node)
        self._prefix_slots = cache.slots(self.node)
        self.tail_tokens: list[int] = []
        self.tail_slots: list[int] = []
        self._tail_pages: dict[int, int] = {}  # page -> tail slots in it

    @classmethod
    def matching(cls, cache: RadixCache, tokens: Sequence[int]) -> PinnedSequence:
        """A sequence holding the longest cached prefix of `tokens`."""
        node, _ = cache.match_prefix(tokens)
        return cls(cache, node)

    @property
    def length(self) -> int:
        return self.node.depth + len(self.tail_tokens)

    @property
    def slots(self) -> list[int]:
        return self._prefix_slots + self.tail_slots

    def tokens(self) -> list[int]:
        return self.cache.path_tokens(self.node) + self.tail_tokens

    def pages_needed(self, n: int) -> int:
        """New pages that `extend` of n tokens would take."""
        pool = self.cache.pool
        last = self.slots[-1] if self.length else None
        room = 0
        nxt = pool.next_slot(last)
        if nxt is not None:
            room = pool.page_size - nxt % pool.page_size
        return max(0, -(-(n - room) // pool.page_size))

    def extend(self, tokens: Sequence[int]) -> list[int]:
        """Slots for `tokens` appended to the tail, evicting unreferenced cache if needed.
        Raises OutOfPages (and changes nothing) when the pool cannot hold them."""
        pool = self.cache.pool
        need = self.pages_needed(len(tokens))
        if need and self.cache.evict(need) < need:
            raise OutOfPages
        last = self.slots[-1] if self.length else None
        new = []
        for _ in tokens:
            slot = pool.next_slot(last)
            if slot is None:
                slot = pool.new_page() * pool.page_size
            pool.take(slot)
            page = slot // pool.page_size
            if page not in self._tail_pages:
                pool.retain({page})
                self._tail_pages[page] = 0
            self._tail_pages[page] += 1
            new.append(slot)
            last = slot
        self.tail_tokens.extend(tokens)
        self.tail_slots.extend(new)
        return new

    def commit(self) -> None:
        """Move the tail into the radix tree; the handle moves to its end."""
        if not self.tail_tokens:
            return
        node, duplicates = self.cache.insert(self.node, self.tail_tokens, self.tail_slots)
        if duplicates:
            # Another sequence cached the same tokens first: use its slots, free ours.
            self.cache.pool.give_back_tail(duplicates)
        self.cache.pin(node)
        self.cache.unpin(self.node)
        self.node = node
        self._prefix_slots = self._prefix_slots + self.cache.slots_between(node, len(self._prefix_slots))
        self._drop_tail(0, give_back=False)  # the slots now belong to the tree

    def rollback(self, length: int) -> None:
        """Keep positions [0, length); free the KV after it."""
        if length >= self.length:
            return
        if length >= self.node.depth:
            self._drop_tail(length - self.node.depth)
            return
        self._drop_tail(0)
        old = self.node
        node = self.cache.node_at(old, length)
        self.cache.pin(node)
        self.cache.unpin(old)
        self.cache.drop_unreferenced(old)
        self.node = node
        del self._prefix_slots[length:]

    def rematch(self, tokens: Sequence[int]) -> None:
        """Drop everything held and pin the longest cached prefix of `tokens` instead."""
        self.release()
        node, _ = self.cache.match_prefix(tokens)
        self.cache.pin(node)
        self.cache.unpin(self.node)
        self.node = node
        self._prefix_slots = self.cache.slots(node)

    def release(self) -> None:
        """Give up the tail and the pin; the committed prefix stays cached until evicted."""
        self._drop_tail(0)
        self.cache.unpin(self.node)
        self.node = self.cache.root
        self.cache.pin(self.node)
        self._prefix_slots = []

    def _drop_tail(self, keep: int, *, give_back: bool = True) -> None:
        pool = self.cache.pool
        dropped = self.tail_slots[keep:]
        if give_back:
            pool.give_back_tail(dropped)
        freed = set()
        for slot in dropped:
            page = slot // pool.page_size
            self._tail_pages[page] -= 1
            if self._tail_pages[page] == 0:
                del self._tail_pages[page]
                freed.add(page)
        pool.release(freed)
        del self.tail_tokens[keep:]
        del self.tail_slots[keep:]


def _common(edge: Sequence[int], tokens: Sequence[int], start: int) -> int:
    """Length of the common prefix of `edge` and `tokens[start:]`."""
    n = min(len(edge), len(tokens) - start)
    i = 0
    # Compare in blocks first: list slices compare in C.
    step = 64
    while i + step <= n and list(edge[i : i + step]) == list(tokens[start + i : start + i + step]):
        i += step
    while i < n and edge[i] == tokens[start + i]:
        i += 1
    return i
