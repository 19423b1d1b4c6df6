"""Synthetic AgentSociety-style All-Gather workload: residents of a simulated city who post one
public message per round, read everyone's messages, reply, and pick someone to befriend.

Each prompt: profile, relationships and memories (stable), the round's intention and emotion,
every agent's message of the last round (shared segments) and a reply / choose-friend task.
Outputs are ``"\\n[<Full Name>] <message>"``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sglang_tokendance.trace.format import Trace
from sglang_tokendance.trace.generators.common import (
    PLACES,
    TIMES,
    TOPICS,
    TRAITS,
    GenParams,
    build_allgather,
    fill_sentences,
    make_names,
    slug,
    word_count,
)

CITIES = ("New Harbor", "Eastvale", "Lumen City", "North Ferris", "Calloway", "Bright Mills")
JOBS = (
    "delivery rider", "primary school teacher", "warehouse supervisor", "junior lawyer",
    "freelance illustrator", "hospital cleaner", "real-estate agent", "data analyst",
    "street food vendor", "taxi driver", "retired engineer", "university student",
    "call-center agent", "construction worker", "small-shop owner", "nurse", "musician",
    "bank clerk", "civil servant", "unemployed former factory worker",
)  # fmt: skip
EDUCATION = ("high school", "vocational college", "bachelor's degree", "master's degree", "PhD")
HOBBIES = (
    "cooking", "football", "knitting", "video games", "birdwatching", "running", "gardening",
    "photography", "board games", "karaoke", "fishing", "reading thrillers", "yoga", "chess",
)  # fmt: skip
VALUES = ("family comes first", "hard work pays off", "people should look out for each other",
          "freedom matters more than comfort", "tradition keeps us grounded",
          "you only live once", "honesty above everything")  # fmt: skip
RELATIONS = ("close friend", "colleague", "neighbor", "acquaintance", "former classmate",
             "rival", "cousin", "online friend", "ex-partner", "mentor")  # fmt: skip
INTENTIONS = (
    "find a better-paid job before the end of the year", "make at least one new close friend",
    "convince others to support the new park project", "save money for a used car",
    "get more people to join a weekend sports club", "understand why prices keep rising",
    "patch things up with an old friend", "find a flatmate to share the rent",
    "learn what others think about the upcoming election", "start a small online business",
    "organize a neighborhood dinner", "feel less lonely after moving to the city",
)  # fmt: skip
EMOTIONS = (
    ("hopeful", "a job interview went better than expected"),
    ("anxious", "the rent is due and money is tight"), ("content", "the weekend was restful"),
    ("irritated", "the buses were late again"), ("lonely", "nobody called yesterday"),
    ("excited", "a friend announced good news"), ("sad", "a neighbor moved away"),
    ("proud", "a long project was finally finished"), ("bored", "nothing much happened today"),
    ("grateful", "a stranger helped carry groceries"), ("angry", "the landlord ignored a request"),
    ("curious", "a new cafe opened nearby"),
)  # fmt: skip
NOTES = (
    "You met {other_first} at {place} {time}.",
    "You often talk with {other_first} about {topic}.",
    "{other_first} once helped you when you were in trouble.",
    "You are not sure you can trust {other_first}.",
    "You and {other_first} disagree about {topic}.",
    "{other_first} invited you to {place} but you did not go.",
)  # fmt: skip
MEMORIES = (
    "You read a long thread online about {topic} {time}.",
    "You overheard an argument about {topic} at {place}.",
    "You spent {time} at {place} and felt {trait} the whole time.",
    "Your family keeps asking you about {topic}.",
    "You promised yourself to stop worrying about {topic}.",
    "You saw {other} at {place} {time} but did not say hello.",
    "You signed a petition about {topic} outside {place}.",
    "You think people in this city are more {trait} than they admit.",
)  # fmt: skip
MESSAGES = (
    "Does anyone else feel that nobody is talking about {topic}?",
    "{other_first}, I liked what you said last time.",
    "I am trying to {intention}, so any tips are welcome.",
    "Honestly I feel {emotion} today.",
    "Anyone want to meet at {place} this weekend?",
    "{other_first}, we should talk more, we seem to have a lot in common.",
    "I was at {place} {time} and everyone was talking about {topic}.",
    "I do not agree with everyone here about {topic}.",
    "Thanks for the kind words, it means a lot.",
    "If you are into {hobby}, let me know.",
    "Prices at {place} went up again, it is getting hard to keep up.",
    "I think we should look out for each other more in this city.",
)  # fmt: skip


@dataclass(slots=True)
class _Citizen:
    first: str
    name: str
    age: int
    job: str
    edu: str
    income: int
    traits: list[str]
    hobbies: list[str]
    value: str
    relations: list[str]
    memories: list[str]
    intention: str
    emotion: tuple[str, str]


class _SocietyScript:
    def __init__(self, rng: random.Random, p: GenParams) -> None:
        self.rng, self.p = rng, p
        self.city = rng.choice(CITIES)
        names = make_names(rng, p.agents)
        self.ids = [slug(f"{f} {last}") for f, last in names]
        self.people = [
            _Citizen(
                f, f"{f} {last}", rng.randint(18, 80), rng.choice(JOBS), rng.choice(EDUCATION),
                rng.randrange(800, 9000, 50), rng.sample(TRAITS, 3), rng.sample(HOBBIES, 2),
                rng.choice(VALUES), [], [], rng.choice(INTENTIONS), rng.choice(EMOTIONS),
            )
            for f, last in names
        ]  # fmt: skip
        budget = max(0, p.private_words - 110 - p.shared_words)  # minus fixed text, state
        for i, c in enumerate(self.people):
            others = [j for j in range(p.agents) if j != i]
            rng.shuffle(others)
            words = 0
            for j in others:
                if words >= budget * 0.6:
                    break
                o = self.people[j]
                note = rng.choice(NOTES).format(**self._ctx(i)() | {"other_first": o.first})
                line = f"{o.name} ({self.ids[j]}): {rng.choice(RELATIONS)}, closeness "
                line += f"{rng.randint(5, 95)}/100. {note}"
                c.relations.append(line)
                words += word_count(line)
            c.memories = fill_sentences(rng, MEMORIES, budget - words, self._ctx(i))

    def _ctx(self, i: int) -> Any:
        c = self.people[i]
        others = [q for j, q in enumerate(self.people) if j != i]

        def ctx() -> dict[str, Any]:
            o = self.rng.choice(others) if others else c
            return {
                "other": o.name, "other_first": o.first, "place": self.rng.choice(PLACES),
                "topic": self.rng.choice(TOPICS), "time": self.rng.choice(TIMES),
                "trait": self.rng.choice(TRAITS), "intention": c.intention,
                "emotion": c.emotion[0], "hobby": self.rng.choice(c.hobbies),
            }  # fmt: skip

        return ctx

    def _message(self, i: int, lead: str = "") -> str:
        w = self.p.shared_words
        target = self.rng.randint(max(1, round(0.75 * w)), max(1, round(1.25 * w)))
        body = fill_sentences(self.rng, MESSAGES, target - word_count(lead), self._ctx(i))
        return f"\n[{self.people[i].name}] " + " ".join([lead, *body] if lead else body)

    def observation(self, i: int) -> str:
        c = self.people[i]
        return self._message(i, f"Hi all, I am {c.first}, a {c.job} living in {self.city}.")

    def prefix(self, i: int, rnd: int, own_past: list[str]) -> str:
        c, rng = self.people[i], self.rng
        if rnd > 1 and rng.random() < 0.25:
            c.intention = rng.choice(INTENTIONS)
        if rnd > 1 and rng.random() < 0.4:
            c.emotion = rng.choice(EMOTIONS)
        head = (
            f"You are {c.name}, a {c.age}-year-old {c.job} living in {self.city}. You are one "
            f"of {self.p.agents} residents of a simulated society; in every round each resident "
            "posts one public message that everyone can read.\n\n## Profile\n"
            f"- Education: {c.edu}\n- Occupation: {c.job}\n- Monthly income: ${c.income}\n"
            f"- Personality: {', '.join(c.traits)}\n- Hobbies: {', '.join(c.hobbies)}\n"
            f'- Values: "{c.value}"\n\n## Relationships\n'
            + "".join(f"- {r}\n" for r in c.relations or ["You do not know anyone here yet."])
            + "\n## Memory\n"
            + "".join(f"- {m}\n" for m in c.memories)
        )
        recent = [o.split("] ", 1)[1] for o in own_past[-2:]]
        state = (
            f"\n## Current state (round {rnd})\nIntention: {c.intention}\n"
            f"Emotion: {c.emotion[0]}, because {c.emotion[1]}.\n"
            + "".join(f'Your earlier message: "{m}"\n' for m in recent)
            + (
                "\n## Public posts you can see\n"
                if rnd == 1
                else "\n## Messages posted in the last round\n"
            )
        )
        return head + state

    def suffix(self, i: int, rnd: int) -> str:
        c = self.people[i]
        return (
            f"\n\n## Task\nAs {c.name}, write your next public message (one to three sentences) "
            "replying to the messages above, in line with your intention, emotion and "
            "personality. Then choose the one resident you would most like to befriend next "
            "(by agent id, not yourself).\n\nAnswer with JSON only: "
            '{"message": "<your message>", "friend": "<agent id>"}'
        )

    def output(self, i: int, rnd: int) -> str:
        return self._message(i)


def agent_society(
    agents: int = 8,
    rounds: int = 4,
    seed: int = 0,
    *,
    private_words: int = 300,
    shared_words: int = 40,
    shuffle: bool = True,
    max_tokens: int = 32,
    arrival_jitter_s: float = 0.0,
) -> Trace:
    """A synthetic AgentSociety All-Gather trace (workload ``agent_society``).

    Parameters as for ``generative_agents``: ``private_words`` is the approximate length of the
    stable profile/relationship/memory part plus the round state (the fixed profile lines come
    on top), ``shared_words`` the mean message length (+-25%), ``shuffle`` per-agent orders.
    """
    params = GenParams(
        agents, rounds, seed, private_words, shared_words, shuffle, max_tokens, arrival_jitter_s
    )
    params.check()
    rng = random.Random(seed)
    script = _SocietyScript(rng, params)
    return build_allgather(script, params, rng, "agent_society", script.city)
