"""The TokenDance records that ride on SGLang objects: one typed record per object, one name.

A hinted request carries one :class:`RequestState` in ``req.tokendance``, built once from its
hint when the scheduler first sees it and read everywhere else (the scheduler hooks, the
collector, the tree cache, the batch hooks). The request pool carries one :class:`PoolState`
in ``req_to_token_pool.tokendance`` (the position table, the probe board, the mirror judge and
the position-tagged attention that the tree cache, the batch hooks and the attention layers
built from the same pools must share).
Nothing else of TokenDance is stored on SGLang objects; ``patches/sglang-0.5.23`` lists these
two names with every other touch point.

Pure records: no SGLang import, no tensors created here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sglang_tokendance.attention.deviation import ProbeBoard
    from sglang_tokendance.attention.mirror_deviation import MirrorJudge
    from sglang_tokendance.attention.tagged import TaggedAttention
    from sglang_tokendance.cache.row_plan import RowLayout, SharedUse
    from sglang_tokendance.positions import PositionTable

ATTR = "tokendance"  # the one attribute name, on Req and on ReqToTokenPool

Role = Literal["waiting", "master", "reuse", "alone"]


@dataclass(slots=True)
class RequestState:
    """Everything TokenDance knows about one hinted request.

    Attributes:
        agent, round_id, round_size: from the hint.
        layout: the request's row plan (a reuse agent: masters it reads, recompute sets);
            None for a master agent (ordinary full prefill) or a request run without sharing.
        role: ``waiting`` (held or planned, not yet decided), ``master`` (computes segments
            whose rows become masters), ``reuse`` (laid out against masters), ``alone``
            (refused or run without its round).
        master_uses: the segments a master agent computes (promoted after its prefill).
        probes: ``(segment id, start, end)`` spans scored during a master agent's prefill.
        insert_cap: the request never matches or inserts radix entries past this index (its
            private prefix), so segment slots never reach the tree.
        released: queued by the plugin (the barrier or a phase let it go).
        counted: its prompt was counted by the accounting.
        prefilled: the collector has handled its prefill (masters promoted / mirrors made).
    """

    agent: str
    round_id: str
    round_size: int
    layout: RowLayout | None = None
    role: Role = "waiting"
    master_uses: list[SharedUse] | None = None
    probes: list[tuple[str, int, int]] | None = None
    insert_cap: int | None = None
    released: bool = False
    counted: bool = False
    prefilled: bool = False


def state_of(req: Any) -> RequestState | None:
    """The request's record, or None for a request without a TokenDance hint."""
    return getattr(req, ATTR, None) if req is not None else None


def attach(req: Any, state: RequestState) -> RequestState:
    """Give ``req`` its record (the only TokenDance attribute a request ever gets)."""
    setattr(req, ATTR, state)
    return state


def layout_of(req: Any) -> RowLayout | None:
    """The request's row plan, if it is laid out."""
    st = state_of(req)
    return st.layout if st is not None else None


@dataclass(slots=True)
class PoolState:
    """TokenDance's record on SGLang's ``ReqToTokenPool`` (created on first use)."""

    positions: PositionTable | None = None
    probes: ProbeBoard | None = None
    attention: TaggedAttention | None = None  # the model runner's position-tagged path
    judge: MirrorJudge | None = None  # --tokendance-mirror threshold only


def pool_state(req_to_token_pool: Any) -> PoolState:
    """The pool's record, created on first use."""
    st = getattr(req_to_token_pool, ATTR, None)
    if st is None:
        st = PoolState()
        setattr(req_to_token_pool, ATTR, st)
    return st
