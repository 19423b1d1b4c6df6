"""Shared machinery of the workload generators: parameters, names, text filling and the
All-Gather round loop. Every random choice goes through one ``random.Random(seed)``."""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sglang_tokendance.trace.format import Segment, Trace, TraceHeader, TraceRequest

FIRST_NAMES = (
    "Amara", "Bastian", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Imani",
    "Jonas", "Keira", "Luca", "Mei", "Nikolai", "Olivia", "Priya", "Quentin", "Rosa", "Santiago",
    "Tamsin", "Umar", "Valentina", "Wendell", "Ximena", "Yusuf", "Zoë", "Aoife", "Bruno",
    "Chidi", "Dalia", "José", "Marguerite",
)  # fmt: skip
LAST_NAMES = (
    "Okafor", "Lindqvist", "Nakamura", "Haddad", "O'Brien", "Kowalczyk", "Moreau", "Castillo",
    "Patel", "Brennan", "Achterberg", "Silva", "Yilmaz", "Novak", "Fitzgerald", "Mensah",
    "Takahashi", "Romano", "Abernathy", "Núñez", "Chen", "Volkov", "Delacroix", "Oyelaran",
    "Svensson", "Kaur", "Whitfield", "Ferreira", "Hoang", "Zielinski",
)  # fmt: skip
TRAITS = (
    "curious", "patient", "stubborn", "warm", "meticulous", "witty", "anxious", "generous",
    "reserved", "ambitious", "playful", "skeptical", "loyal", "impulsive", "thoughtful",
    "outspoken", "gentle", "competitive", "dreamy", "practical", "sarcastic", "cheerful",
    "methodical", "restless", "kind-hearted", "proud", "easygoing", "observant", "idealistic",
    "frugal", "sentimental", "disciplined", "talkative", "shy", "resourceful", "blunt",
)  # fmt: skip
PLACES = (
    "the bakery on Elm Street", "the public library", "the riverside park", "the farmers market",
    "the community center", "the old train station", "the hardware store", "the corner cafe",
    "the high school gym", "the town hall", "the pottery studio", "the bus depot",
    "the harbor", "the night market", "the bookshop", "the music school", "the clinic",
    "the bowling alley", "the greenhouse", "the pier",
)  # fmt: skip
TOPICS = (
    "the new bike lanes", "rising rents", "the upcoming election", "the weekend storm",
    "the school fundraiser", "a stray dog near the park", "the price of coffee",
    "the broken streetlight on Pine Avenue", "a jazz concert next Friday", "the recycling rules",
    "the river cleanup", "the late buses", "a rumor about the factory closing",
    "the chess tournament", "the spring festival", "a new ramen place", "the noisy construction",
    "the library's extended hours", "a power outage last night", "the town's anniversary",
    "a lost wallet", "the art exhibit at the community center", "the heat wave",
    "a charity run", "the new mural downtown", "the quiz night at the pub",
)  # fmt: skip
TIMES = ("this morning", "yesterday evening", "last weekend", "at lunch", "earlier today")


def slug(name: str) -> str:
    """An ASCII agent id from a display name: 'Zoë O'Brien' -> 'zoe_obrien'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = ascii_name.lower().replace("'", "")
    return re.sub(r"[^a-z0-9]+", "_", ascii_name).strip("_")


def make_names(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` distinct (first, last) names; first names repeat only after all are used."""
    firsts, lasts = list(FIRST_NAMES), list(LAST_NAMES)
    rng.shuffle(firsts)
    rng.shuffle(lasts)
    nf, nl = len(firsts), len(lasts)
    out = []
    for i in range(n):
        k, j = divmod(i, nf)
        last = lasts[(j + k) % nl]
        if i >= nf * nl:
            last = f"{last} {i // (nf * nl) + 1}"
        out.append((firsts[j], last))
    return out


def word_count(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return len(text.split())


def fill_sentences(
    rng: random.Random,
    templates: Sequence[str],
    target: int,
    context: Callable[[], dict[str, Any]],
) -> list[str]:
    """Sentences from ``templates`` (filled with a fresh ``context()`` each) until about
    ``target`` words: stops at the count closest to the target, always at least one."""
    order = list(templates)
    rng.shuffle(order)
    out: list[str] = []
    total = 0
    i = 0
    while total < target:
        if i == len(order):
            rng.shuffle(order)
            i = 0
        sent = order[i].format(**context())
        i += 1
        n = word_count(sent)
        if out and total + n - target > target - total:
            break
        out.append(sent)
        total += n
    return out


@dataclass(slots=True, frozen=True)
class GenParams:
    """The parameters every generator takes (see ``generate``)."""

    agents: int = 8
    rounds: int = 4
    seed: int = 0
    private_words: int = 300
    shared_words: int = 40
    shuffle: bool = True
    max_tokens: int = 32
    arrival_jitter_s: float = 0.0

    def check(self) -> None:
        """Raise ValueError for an out-of-range parameter."""
        for name in ("agents", "rounds", "shared_words", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.private_words < 0 or self.arrival_jitter_s < 0:
            raise ValueError("private_words and arrival_jitter_s must be >= 0")


class Script(Protocol):
    """What a workload supplies to :func:`build_allgather` (agent index ``i`` into ``ids``)."""

    ids: list[str]

    def observation(self, i: int) -> str: ...

    def prefix(self, i: int, rnd: int, own_past: list[str]) -> str: ...

    def suffix(self, i: int, rnd: int) -> str: ...

    def output(self, i: int, rnd: int) -> str: ...


def _orders(rng: random.Random, n: int, shuffle: bool) -> list[list[int]]:
    """One order of 0..n-1 per agent; shuffled orders are distinct within the round."""
    if not shuffle:
        return [list(range(n)) for _ in range(n)]
    seen: set[tuple[int, ...]] = set()
    out = []
    for _ in range(n):
        order = list(range(n))
        for _attempt in range(100):
            rng.shuffle(order)
            if tuple(order) not in seen:
                break
        seen.add(tuple(order))
        out.append(order)
    return out


def build_allgather(
    script: Script, params: GenParams, rng: random.Random, workload: str, town: str
) -> Trace:
    """The All-Gather rounds: round r shares round r-1's outputs (ids ``r<r-1>/<agent>``);
    round 1 shares each agent's observation (ids ``r0/<agent>``)."""
    ids = script.ids
    prev = [script.observation(i) for i in range(len(ids))]
    past: list[list[str]] = [[] for _ in ids]
    requests: list[TraceRequest] = []
    for rnd in range(1, params.rounds + 1):
        orders = _orders(rng, len(ids), params.shuffle)
        outputs = []
        for i, agent in enumerate(ids):
            segs = [Segment("private", script.prefix(i, rnd, past[i]))]
            for j in orders[i]:
                segs.append(Segment("shared", prev[j], f"r{rnd - 1}/{ids[j]}", ids[j]))
            segs.append(Segment("private", script.suffix(i, rnd)))
            out = script.output(i, rnd)
            arrival = None
            if params.arrival_jitter_s > 0:
                arrival = round(rng.uniform(0.0, params.arrival_jitter_s), 3)
            requests.append(TraceRequest(rnd, agent, segs, params.max_tokens, out, arrival))
            outputs.append(out)
        for i, out in enumerate(outputs):
            past[i].append(out)
        prev = outputs
    header = TraceHeader(
        workload=workload,
        agents=list(ids),
        rounds=params.rounds,
        source=f"generator:{workload} seed={params.seed}",
        extra={"generator": {"workload": workload, "town": town, **asdict(params)}},
    )
    return Trace(header, requests)
