"""Mirror operations of :class:`~.store.SegmentStore` (a mixin, split out for size).

A mirror is keyed by (round id, agent, node id) and held twice: in the store's mirror table
(for lookups and releases by agent / round) and in its node's ``mirrors`` (the node's
references, which make the master protected). Every change goes through ``_leave`` / ``_enter``
so the store's token totals stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .nodes import AllGatherNode, Mirror, MirrorKey, as_slot_tensor, check_sorted_unique, resolve


class MirrorOps:
    """Mirror half of the store; the state and bookkeeping below are the store's."""

    _free: Callable[[torch.Tensor], None]
    _mirrors: dict[MirrorKey, Mirror]
    mirror_tokens: int

    def _leave(self, node: AllGatherNode) -> None:
        raise NotImplementedError

    def _enter(self, node: AllGatherNode) -> None:
        raise NotImplementedError

    def _check_live(self, node: AllGatherNode) -> None:
        raise NotImplementedError

    def touch(self, node: AllGatherNode) -> None:
        raise NotImplementedError

    def attach_mirror(
        self,
        round_id: str,
        agent: str,
        node: AllGatherNode,
        indices: torch.Tensor | Sequence[int],
        slots: torch.Tensor | Sequence[int],
        at: int = 0,
    ) -> Mirror:
        """Give ``agent`` a mirror of ``node`` for ``round_id`` (the occurrence starting at
        prompt position ``at``); the store takes ``slots``.

        An existing mirror with the same key is replaced and its slots are freed (except any
        that the new mirror reuses).

        Raises:
            ValueError: if ``node`` is not live, ``indices`` is not sorted unique in
                ``[0, L)``, lengths differ, or a slot is 0.
        """
        self._check_live(node)
        idx = as_slot_tensor(indices, "indices")
        problem = check_sorted_unique(idx, node.length, f"mirror of segment {node.node_id}")
        if problem:
            raise ValueError(problem)
        own = as_slot_tensor(slots, "slots")
        if own.numel() != idx.numel():
            raise ValueError(f"{idx.numel()} mirror indices but {own.numel()} slots")
        if own.numel() and int(own.min()) < 1:
            raise ValueError("slot 0 is SGLang's padding slot and cannot hold mirror KV")
        key = MirrorKey(round_id, agent, node.node_id, int(at))
        self._leave(node)
        old = self._mirrors.pop(key, None)
        if old is not None:
            del node.mirrors[key]
            self.mirror_tokens -= old.num_slots
            stale = old.slots[~torch.isin(old.slots, own)]
            if stale.numel():
                self._free(stale)
        mirror = Mirror(key, node, idx, own)
        self._mirrors[key] = mirror
        node.mirrors[key] = mirror
        self.mirror_tokens += mirror.num_slots
        self._enter(node)
        self.touch(node)
        return mirror

    def get_mirror(
        self, round_id: str, agent: str, node: AllGatherNode, at: int = 0
    ) -> Mirror | None:
        return self._mirrors.get(MirrorKey(round_id, agent, node.node_id, int(at)))

    def get_mirror_by_key(self, key: MirrorKey) -> Mirror | None:
        return self._mirrors.get(key)

    def resolve(self, round_id: str, agent: str, node: AllGatherNode, at: int = 0) -> torch.Tensor:
        """``agent``'s slot list for ``node`` in ``round_id`` (see :func:`nodes.resolve`).

        Raises:
            KeyError: if the agent has no mirror of that segment in that round.
        """
        mirror = self.get_mirror(round_id, agent, node, at)
        if mirror is None:
            raise KeyError(f"no mirror for round {round_id!r}, agent {agent!r}, {node!r}")
        self.touch(node)
        return resolve(mirror)

    def mirrors(self) -> Iterator[Mirror]:
        return iter(list(self._mirrors.values()))

    def _drop_mirror(self, mirror: Mirror) -> torch.Tensor:
        """Unlink ``mirror`` and return its slots (not yet freed)."""
        node = mirror.node
        self._leave(node)
        del self._mirrors[mirror.key]
        del node.mirrors[mirror.key]
        self.mirror_tokens -= mirror.num_slots
        self._enter(node)
        return mirror.slots

    def release_mirrors(self, agent: str | None = None, round_id: str | None = None) -> int:
        """Drop the mirrors matching ``agent`` and/or ``round_id`` (None matches any).

        Returns:
            the number of slots freed.
        """
        chosen = [
            m
            for k, m in self._mirrors.items()
            if (agent is None or k.agent == agent) and (round_id is None or k.round_id == round_id)
        ]
        freed = [self._drop_mirror(m) for m in chosen]
        return self._free_all(freed)

    def release_mirror_keys(self, keys: Iterable[MirrorKey]) -> int:
        """Drop the mirrors with these keys (missing ones: already gone with their master).

        Returns:
            the number of slots freed.
        """
        chosen = [m for k in keys if (m := self._mirrors.get(k)) is not None]
        return self._free_all([self._drop_mirror(m) for m in chosen])

    def _free_all(self, tensors: Iterable[torch.Tensor]) -> int:
        parts = [t for t in tensors if t.numel()]
        if not parts:
            return 0
        slots = torch.cat(parts)
        self._free(slots)
        return int(slots.numel())
