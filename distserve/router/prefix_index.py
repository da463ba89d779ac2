"""The router's prefix index: which instances hold which chained block hashes.

Owns, per block hash (``distserve.engine.block_hash``; each hash names its whole prefix), the
instances believed to hold it with their last access time, the parent link, a child count and
the times of recent requests through it. Fed by the router's own assignments (``insert``, an
optimistic claim made at dispatch time) and by instance events (``blocks_stored`` /
``blocks_evicted``). It does not own any routing rule (``policies/``) or real KV memory.

Because hashes are chained, the index is a trie with one block per node:

    ROOT ─ h0 ─ h1 ─ h2 ─ h3          request A: h0 h1 h2 h3
                  └─ h2' ─ h3'        request B: h0 h1 h2' h3'   (branch after h1)

``match(hashes)`` walks the prompt's hashes once and narrows the set of instances still holding
every block so far, so it costs O(prompt blocks × instances still matching), never a scan over
the index; ``num_cached(iid, hashes)`` asks the same for one instance. Per instance the held
hashes are kept in LRU order (oldest first): a path is touched leaf first, so its root is the
most recent and eviction takes leaves before their prefixes, as the engine's prefix cache does.

A policy that keeps per-prefix state keyed by some hashes (``preble``: its radix-tree nodes)
``watch``es them and learns of every change of their holder sets through one listener, called
``listener(h, instance_id, is_added)`` right after the change — whatever caused it (a claim, an
instance event, a capacity drop, a removed instance).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence

HolderListener = Callable[[int, str, bool], None]


class _Entry:
    """One block hash of the trie (slots: there may be millions)."""

    __slots__ = ("holders", "num_children", "parent", "request_times")

    def __init__(self, parent: int | None) -> None:
        self.parent = parent  # hash of the previous block; None when only known from events
        self.holders: dict[str, float] = {}  # instance -> last access (s)
        self.num_children = 0  # entries whose parent is this hash
        self.request_times: deque[float] | None = None  # recent requests through it, if counted


class PrefixIndex:
    """Block hash → instances holding it; per instance an LRU view and an optional capacity."""

    def __init__(self, window_s: float = 180.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._entries: dict[int, _Entry] = {}
        self._by_instance: dict[str, OrderedDict[int, None]] = {}  # LRU order, oldest first
        self._capacity: dict[str, int | None] = {}
        self._watched: set[int] = set()
        self._listener: HolderListener | None = None

    # ---- instances -------------------------------------------------------------------------
    def add_instance(self, instance_id: str, capacity_blocks: int | None = None) -> None:
        """Track ``instance_id``; router claims beyond ``capacity_blocks`` drop its LRU blocks."""
        self._by_instance.setdefault(instance_id, OrderedDict())
        self._capacity[instance_id] = capacity_blocks

    def remove_instance(self, instance_id: str) -> int:
        """Forget an instance and everything it held; returns the number of blocks dropped."""
        held = self._by_instance.pop(instance_id, OrderedDict())
        self._capacity.pop(instance_id, None)
        for h in held:
            self._drop_holder(h, instance_id)
        return len(held)

    @property
    def instances(self) -> list[str]:
        return list(self._by_instance)

    def num_blocks(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, ()))

    def lru_blocks(self, instance_id: str) -> Iterator[int]:
        """The instance's blocks, least recently used first."""
        return iter(self._by_instance.get(instance_id, ()))

    # ---- watching holder sets -------------------------------------------------------------
    def set_holder_listener(self, listener: HolderListener | None) -> None:
        """Call ``listener(h, instance_id, is_added)`` whenever a watched hash gains or loses a
        holder (one listener per index)."""
        self._listener = listener

    def watch(self, h: int) -> None:
        self._watched.add(h)

    def unwatch(self, h: int) -> None:
        self._watched.discard(h)

    # ---- updates ---------------------------------------------------------------------------
    def insert(self, instance_id: str, hashes: Sequence[int], now_s: float) -> None:
        """The router routed a prompt with these hashes to ``instance_id``: it will hold them."""
        self._link_path(hashes)
        self._hold(instance_id, reversed(hashes), now_s)

    def record_request(self, hashes: Sequence[int], now_s: float) -> None:
        """Count one request through each of these (already inserted) blocks, for windowed stats."""
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None:
                if entry.request_times is None:
                    entry.request_times = deque()
                entry.request_times.append(now_s)

    def blocks_stored(self, instance_id: str, hashes: Sequence[int], now_s: float = 0.0) -> None:
        """Instance event: these blocks are now in its prefix cache (parents first)."""
        self._hold(instance_id, reversed(hashes), now_s)

    def blocks_evicted(self, instance_id: str, hashes: Iterable[int]) -> None:
        """Instance event: these blocks left its prefix cache."""
        held = self._by_instance.get(instance_id)
        if held is None:
            return
        for h in hashes:
            if h in held:
                del held[h]
                self._drop_holder(h, instance_id)

    # ---- queries ---------------------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per instance holding the first block, how many leading blocks of ``hashes`` it holds."""
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(hashes):
            holders = self.holders(h)
            if alive is None:
                alive = set(holders)
            else:
                for iid in [i for i in alive if i not in holders]:
                    result[iid] = depth
                    alive.discard(iid)
            if not alive:
                return result
        for iid in alive or ():
            result[iid] = len(hashes)
        return result

    def num_cached(self, instance_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the instance holds."""
        n = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or instance_id not in entry.holders:
                break
            n += 1
        return n

    def deepest_present(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` some instance holds (blocks, any instance)."""
        depth = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None or not entry.holders:
                break
            depth += 1
        return depth

    def holders(self, h: int) -> dict[str, float]:
        """Instances holding block ``h`` (→ last access); empty when none. Do not mutate."""
        entry = self._entries.get(h)
        return entry.holders if entry is not None else {}

    def node_ends(self, hashes: Sequence[int]) -> list[int]:
        """Where the radix-tree nodes along ``hashes`` end (exclusive, in blocks): after each
        branch block and after the last block."""
        entries = self._entries
        ends = []
        for i, h in enumerate(hashes):
            entry = entries.get(h)
            if entry is not None and entry.num_children > 1:
                ends.append(i + 1)
        if hashes and (not ends or ends[-1] != len(hashes)):
            ends.append(len(hashes))
        return ends

    def is_branch(self, h: int) -> bool:
        """Whether more than one distinct block follows ``h`` (a radix-tree node boundary)."""
        entry = self._entries.get(h)
        return entry is not None and entry.num_children > 1

    def num_requests(self, h: int, now_s: float) -> int:
        """Requests through block ``h`` in the last ``window_s`` seconds."""
        entry = self._entries.get(h)
        if entry is None or entry.request_times is None:
            return 0
        times, horizon = entry.request_times, now_s - self.window_s
        while times and times[0] < horizon:
            times.popleft()
        return len(times)

    def __len__(self) -> int:
        return len(self._entries)

    # ---- internals -------------------------------------------------------------------------
    def _link_path(self, hashes: Sequence[int]) -> None:
        entries = self._entries
        parent: int | None = None
        parent_entry: _Entry | None = None
        for h in hashes:
            entry = entries.get(h)
            if entry is None:
                entry = entries[h] = _Entry(parent=parent)
                if parent_entry is not None:
                    parent_entry.num_children += 1
            elif entry.parent is None and parent_entry is not None:
                entry.parent = parent
                parent_entry.num_children += 1
            parent, parent_entry = h, entry

    def _hold(self, instance_id: str, hashes_leaf_first: Iterable[int], now_s: float) -> None:
        held = self._by_instance.get(instance_id)
        if held is None:
            raise KeyError(f"unknown instance {instance_id!r}; call add_instance first")
        entries, watched, listener = self._entries, self._watched, self._listener
        for h in hashes_leaf_first:
            entry = entries.get(h)
            if entry is None:
                entry = entries[h] = _Entry(parent=None)
            holders = entry.holders
            is_new = instance_id not in holders
            holders[instance_id] = now_s
            if is_new:
                held[h] = None
                if listener is not None and h in watched:
                    listener(h, instance_id, True)
            else:
                held.move_to_end(h)
        capacity = self._capacity.get(instance_id)
        if capacity is not None:
            while len(held) > capacity:
                oldest, _ = held.popitem(last=False)
                self._drop_holder(oldest, instance_id)

    def _drop_holder(self, h: int, instance_id: str) -> None:
        entry = self._entries.get(h)
        if entry is None:
            return
        if (
            entry.holders.pop(instance_id, None) is not None
            and h in self._watched
            and self._listener is not None
        ):
            self._listener(h, instance_id, False)
        # Garbage-collect held-by-nobody leaves, walking up while parents become such leaves.
        while entry is not None and not entry.holders and entry.num_children == 0:
            del self._entries[h]
            parent = entry.parent
            if parent is None:
                return
            entry = self._entries.get(parent)
            assert entry is not None, "a linked parent outlives its children"
            entry.num_children -= 1
            h = parent

    def check_consistency(self) -> None:
        """Assert the index's internal invariants (tests call this)."""
        for iid, held in self._by_instance.items():
            for h in held:
                assert iid in self._entries[h].holders, f"{iid} lists {h} but is not its holder"
            cap = self._capacity.get(iid)
            assert cap is None or len(held) <= cap, f"{iid} over capacity"
        children: dict[int, int] = {}
        for h, entry in self._entries.items():
            for iid in entry.holders:
                assert h in self._by_instance.get(iid, {}), f"holder {iid} of {h} does not list it"
            if entry.parent is not None:
                assert entry.parent in self._entries, f"parent of {h} missing"
                children[entry.parent] = children.get(entry.parent, 0) + 1
            assert entry.holders or entry.num_children, f"{h} is held by nobody and has no child"
        for h, entry in self._entries.items():
            assert entry.num_children == children.get(h, 0), f"child count of {h} is wrong"
