"""All-Gather rounds with TokenDance hints for SGLang frontend programs (``sgl.function``).

A program marks which parts of each agent's prompt are shared and which round a generation
belongs to; :class:`TokenDanceEndpoint` (a ``RuntimeEndpoint``) turns that into the
``kv_hints`` of every ``sgl.gen`` it sends to ``/generate``::

    @sgl.function
    def round_fn(s, agents, personas, outputs, prev_round, round_id):
        s += "A town chat.\\n"                            # common prefix (radix cache)
        forks = s.fork(len(agents))
        for f, a in zip(forks, agents):
            f += personas[a]                              # private
        all_gather_round(forks, outputs, prev_round, agents=agents)   # shared: r<r-1>/<agent>
        begin_round(forks, agents, round_id)              # hint: round id, size, agent
        for f, a in zip(forks, agents):
            f += f"\\n{a}:" + sgl.gen("say", max_tokens=16)

The segment log lives in the state's variables (reserved names below) so ``s.fork`` copies it
to the children; entries are immutable tuples, and each entry keeps the text it covers: at send
time an entry whose text no longer sits at its recorded offset is dropped (logged), so a hint
never mislabels text. Generations of states without :func:`begin_round` are sent plainly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.global_config import global_config
from sglang.lang.interpreter import ProgramState, ProgramStateGroup, StreamExecutor
from sglang.lang.ir import SglSamplingParams

from sglang_tokendance.hints import build_request
from sglang_tokendance.routing import routing_headers

logger = logging.getLogger(__name__)

SEGMENTS_VAR = "__tokendance_segments__"  # tuple of (start, end, id, source, text)
ROUND_VAR = "__tokendance_round__"  # (round id, round size, agent, group or None)
LOGPROB_KEYS = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
)


@dataclass(slots=True)
class SentGeneration:
    """One hinted generation: what was sent (segments as (type, id, text, source)) and got."""

    round_id: str
    round_size: int
    agent: str
    segments: list[tuple[str, str | None, str, str | None]]
    max_tokens: int
    group: str | None = None
    output: str = ""
    meta_info: dict[str, Any] = field(default_factory=dict)


def add_shared(state: ProgramState, seg_id: str, text: str, source: str | None = None) -> None:
    """Append ``text`` to ``state`` as the shared segment ``seg_id`` (output of ``source``)."""
    if not text:
        return
    exe = state.stream_executor
    exe.sync()  # everything queued so far is in text_, so the segment starts at len(text_)
    start = len(exe.text_)
    log = _entries(exe.variables.get(SEGMENTS_VAR))
    exe.variables[SEGMENTS_VAR] = (*log, (start, start + len(text), seg_id, source, text))
    state += text


States = Sequence[ProgramState] | ProgramStateGroup


def _list(states: States) -> list[ProgramState]:
    return list(states.states) if isinstance(states, ProgramStateGroup) else list(states)


def begin_round(
    states: States, agents: Sequence[str], round_id: str, group: str | None = None
) -> None:
    """Mark the following generations of ``states[i]`` as agent ``agents[i]`` of ``round_id``
    (round size: ``len(states)``). ``group``: the routing key (the simulation), sent in the
    hint and as the X-SMG-Routing-Key header; None: the endpoint's, else derived from the
    round id (:func:`sglang_tokendance.routing.default_group`)."""
    states = _list(states)
    if len(states) != len(agents):
        raise ValueError(f"{len(states)} states but {len(agents)} agents")
    for st, agent in zip(states, agents, strict=True):
        st.stream_executor.sync()  # an earlier queued gen must not see the new round
        st.stream_executor.variables[ROUND_VAR] = (str(round_id), len(states), str(agent), group)


def all_gather_round(
    states: States,
    outputs: Mapping[str, str],
    round_id: str,
    *,
    agents: Sequence[str] | None = None,
    include_own: bool = True,
    order: Callable[[int, list[str]], list[str]] | None = None,
) -> None:
    """Append every agent's output of round ``round_id`` to every state as shared segments.

    Args:
        states: one forked state per agent (a list or the group ``s.fork(n)`` returns).
        outputs: agent -> its output text as the application wraps it (e.g. ``"\\nBob: hi"``).
        round_id: the round that produced ``outputs``; segment ids are ``<round_id>/<agent>``.
        agents: the agent of each state (default: ``outputs``' keys in order).
        include_own: whether an agent also sees its own output.
        order: ``order(i, names)`` -> the order in which state ``i`` sees the outputs.
    """
    states = _list(states)
    agents = list(agents if agents is not None else outputs)
    if len(agents) != len(states):
        raise ValueError(f"{len(states)} states but {len(agents)} agents")
    for i, (st, me) in enumerate(zip(states, agents, strict=True)):
        names = [a for a in outputs if include_own or a != me]
        for src in order(i, names) if order else names:
            add_shared(st, f"{round_id}/{src}", outputs[src], src)


def _entries(value: Any) -> tuple[tuple[int, int, str, str | None, str], ...]:
    # After ProgramStateGroup.join("gather_variable") a parent may hold a list of child logs.
    if isinstance(value, tuple) and all(isinstance(e, tuple) and len(e) == 5 for e in value):
        return value
    return ()


def segments_of(exe: StreamExecutor) -> list[tuple[str, str | None, str, str | None]]:
    """The state's text as (type, id, text, source) segments: logged shared spans that still
    match the text, private text around them."""
    text, pos, out = exe.text_, 0, []
    for start, end, sid, src, seg_text in sorted(_entries(exe.variables.get(SEGMENTS_VAR))):
        if start < pos or text[start:end] != seg_text:
            logger.warning(
                "shared segment %s is no longer at [%d, %d): sent as private", sid, start, end
            )
            continue
        if start > pos:
            out.append(("private", None, text[pos:start], None))
        out.append(("shared", sid, seg_text, src))
        pos = end
    if pos < len(text):
        out.append(("private", None, text[pos:], None))
    return out


class TokenDanceEndpoint(RuntimeEndpoint):
    """A ``RuntimeEndpoint`` whose generations carry TokenDance hints (``kv_hints``).

    Args:
        base_url: the SGLang server.
        on_generation: called (from the program's worker threads) with each hinted
            generation once its answer is back.
        group: the routing key of rounds whose :func:`begin_round` names none (one endpoint
            per simulation); None: derived from the round id.
        Other arguments as ``RuntimeEndpoint``. Every hinted generation is also kept in
        :attr:`history` (thread-safe).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: str | None = None,
        chat_template_name: str | None = None,
        on_generation: Callable[[SentGeneration], None] | None = None,
        group: str | None = None,
    ) -> None:
        super().__init__(base_url, api_key, verify, chat_template_name)
        self.on_generation = on_generation
        self.group = group
        self.history: list[SentGeneration] = []
        self._lock = threading.Lock()

    def _body(
        self, s: StreamExecutor, sp: SglSamplingParams
    ) -> tuple[dict[str, Any], SentGeneration | None]:
        """The /generate body of RuntimeEndpoint.generate (SGLang 0.5.23) plus kv_hints."""
        self._handle_dtype_to_regex(sp)
        data: dict[str, Any] = {
            "text": s.text_,
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **sp.to_srt_kwargs(),
            },
        }
        for item in LOGPROB_KEYS:
            if getattr(sp, item, None) is not None:
                data[item] = getattr(sp, item)
        self._add_images(s, data)
        rnd = s.variables.get(ROUND_VAR)
        if not (isinstance(rnd, tuple) and len(rnd) == 4):
            return data, None
        round_id, size, agent, group = rnd
        group = group if group is not None else self.group
        segs = segments_of(s)
        triples = [(t, i, x) for t, i, x, _ in segs]
        text, hints = build_request(triples, round_id, size, agent, group=group)
        assert text == s.text_, "segments must tile the state's text"
        data["kv_hints"] = hints
        sent = SentGeneration(round_id, size, agent, segs, int(sp.max_new_tokens or 0), group)
        return data, sent

    def _post(self, data: dict[str, Any], stream: bool) -> requests.Response:
        """POST /generate with the routing header (SGLang's http_request sends no headers)."""
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(routing_headers(data.get("kv_hints")))
        return requests.post(
            self.base_url + "/generate",
            json=data,
            stream=stream,
            headers=headers,
            verify=self.verify if self.verify is not None else True,
        )

    def _done(self, sent: SentGeneration | None, text: str, meta: dict[str, Any]) -> None:
        if sent is None:
            return
        sent.output, sent.meta_info = text, meta
        with self._lock:
            self.history.append(sent)
        if self.on_generation is not None:
            self.on_generation(sent)

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> Any:
        """As RuntimeEndpoint.generate, with the state's TokenDance hint attached."""
        data, sent = self._body(s, sampling_params)
        res = self._post(data, stream=False)
        self._assert_success(res)
        obj = res.json()
        self._done(sent, obj["text"], obj["meta_info"])
        return obj["text"], obj["meta_info"]

    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """As RuntimeEndpoint.generate_stream, with the state's TokenDance hint attached."""
        import json

        data, sent = self._body(s, sampling_params)
        data["stream"] = True
        res = self._post(data, stream=True)
        self._assert_success(res)
        pos, out, meta = 0, "", {}
        for line in res.iter_lines(decode_unicode=False):
            chunk = line.decode("utf-8")
            if not chunk.startswith("data:") or chunk == "data: [DONE]":
                if chunk == "data: [DONE]":
                    break
                continue
            obj = json.loads(chunk[5:].strip("\n"))
            piece, meta = obj["text"][pos:], obj["meta_info"]
            pos += len(piece)
            out += piece
            yield piece, meta
        self._done(sent, out, meta)
