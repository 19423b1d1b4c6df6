"""The round ledger: what each round's mirrors stored, kept after the mirrors are gone.

A mirror lives exactly as long as the request whose prefill made it (its slots are freed when
that request is released), so once a round has finished the store holds none of its mirrors.
The ledger records every mirror as it is attached, by round, so the storage a round used at
its fullest (masters it read through, mirror slots, what dense copies would have cost) can
still be reported afterwards. Plain integers and dicts: no tensors, no SGLang.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .nodes import AllGatherNode, Mirror, SegmentId

MAX_ROUNDS = 256  # rounds remembered (oldest forgotten first)


@dataclass(slots=True)
class RoundRecord:
    """Storage of one round's mirrors, summed as they were attached."""

    mirrors: int = 0
    mirror_tokens: int = 0
    dense_equiv_tokens: int = 0  # sum of the mirrored segments' lengths, per mirror
    node_lengths: dict[SegmentId, int] = field(default_factory=dict)  # masters read through

    def stats(self) -> dict[str, float | int | None]:
        """The same keys as :func:`.audit.segment_stats` for this round's view."""
        masters = sum(self.node_lengths.values())
        stored = masters + self.mirror_tokens
        return {
            "segments": len(self.node_lengths),
            "mirrors": self.mirrors,
            "master_tokens": masters,
            "mirror_tokens": self.mirror_tokens,
            "mirrored_master_tokens": masters,
            "dense_equiv_tokens": self.dense_equiv_tokens,
            "stored_tokens": stored,
            "compression_ratio": self.dense_equiv_tokens / stored if stored else None,
            "segment_lengths": sorted(self.node_lengths.values()),
        }


class RoundLedger:
    """Per-round storage records of the newest :data:`MAX_ROUNDS` rounds."""

    def __init__(self, max_rounds: int = MAX_ROUNDS) -> None:
        self._rounds: OrderedDict[str, RoundRecord] = OrderedDict()
        self._max = max_rounds
        self.total = RoundRecord()  # every round since start (never forgotten; not its masters)
        self.total_stored_tokens = 0  # per round: masters read through + mirror slots

    def record(self, mirror: Mirror) -> None:
        """Count ``mirror`` (just attached) in its round."""
        self.record_use(mirror.key.round_id, mirror.node, mirror.num_slots)

    def record_use(self, rid: str, node: AllGatherNode, slots: int) -> None:
        """Count one agent's view of ``node`` in round ``rid`` that keeps ``slots`` own slots
        (0 when the agent's recomputed slots were dropped)."""
        rec = self._rounds.get(rid)
        if rec is None:
            rec = self._rounds[rid] = RoundRecord()
            while len(self._rounds) > self._max:
                self._rounds.popitem(last=False)
        self.total_stored_tokens += slots + (0 if node.node_id in rec.node_lengths else node.length)
        for r in (rec, self.total):
            r.mirrors += 1
            r.mirror_tokens += slots
            r.dense_equiv_tokens += node.length
        rec.node_lengths[node.node_id] = node.length

    def stats(self, round_id: str) -> dict[str, float | int | None]:
        """The round's storage view (all zero, ratio None, for a round without mirrors)."""
        return self._rounds.get(round_id, RoundRecord()).stats()

    def totals(self) -> dict[str, float | int | None]:
        """Views of every round since start: mirrors, mirror slots, what dense copies would
        have cost, what was stored (each round's masters once, plus its mirror slots)."""
        t, stored = self.total, self.total_stored_tokens
        return {
            "mirrors": t.mirrors,
            "mirror_tokens": t.mirror_tokens,
            "dense_equiv_tokens": t.dense_equiv_tokens,
            "stored_tokens": stored,
            "compression_ratio": t.dense_equiv_tokens / stored if stored else None,
        }

    def clear(self) -> None:
        self._rounds.clear()
