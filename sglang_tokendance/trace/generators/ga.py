"""Synthetic GenerativeAgents-style All-Gather workload: town residents in a round-based chat.

Each prompt: persona summary (name, age, traits, occupation, lifestyle, daily plan), seed and
retrieved memories, the round's observations or utterances of every agent (shared segments) and
a next-utterance instruction. Outputs are ``"\\n<Full Name>: <utterance>"``.
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

TOWNS = ("Maple Hollow", "Riverbend", "Cedar Falls", "Port Alder", "Willowmere", "Stonebridge")
OCCUPATIONS = (
    ("baker", "Crumb & Co.", "starts the ovens before dawn and knows every regular's order"),
    ("pharmacist", "Willow Pharmacy", "fills prescriptions and gently nags people about sleep"),
    ("high school chemistry teacher", "Stonebridge High", "runs the after-school science club"),
    ("bus driver", "the municipal transit office", "drives the loop route along the river"),
    ("librarian", "the public library", "organizes reading circles for kids and retirees"),
    ("carpenter", "a small workshop on Mill Road", "builds furniture from reclaimed wood"),
    ("nurse", "the town clinic", "works long shifts and remembers every patient's name"),
    ("graduate student in ecology", "the state university", "counts birds along the river"),
    ("bartender", "The Copper Kettle pub", "listens to everyone's stories over the counter"),
    ("software developer", "a remote startup", "writes code from the corner cafe most days"),
    ("florist", "Petal Post", "arranges bouquets for weddings and funerals alike"),
    ("retired postal worker", "home", "volunteers at the community center three days a week"),
    ("veterinarian", "the animal hospital", "treats farm animals and house cats"),
    ("journalist", "the Riverbend Gazette", "covers town council meetings and local sports"),
    ("mechanic", "Dent & Bolt Garage", "fixes old cars and refuses to overcharge anyone"),
    ("painter", "a studio above the bookshop", "paints portraits of the town's elders"),
    ("grocery store manager", "FreshWay Market", "orders stock and settles staff schedules"),
    ("music teacher", "the music school", "teaches piano and conducts the youth choir"),
    ("fisherman", "the harbor", "heads out on his boat before sunrise"),
    ("city council member", "the town hall", "drafts proposals about housing and parks"),
    ("barista", "the corner cafe", "experiments with new coffee blends"),
    ("firefighter", "Station 2", "trains volunteers and inspects old buildings"),
    ("tailor", "Stitch in Time", "alters suits and teaches sewing on Sundays"),
    ("park ranger", "the riverside park", "leads guided walks and checks the trails"),
    ("dentist", "Bright Smile Dental", "runs a free clinic day once a month"),
    ("potter", "the pottery studio", "throws bowls and teaches evening classes"),
    ("chef", "the new ramen place", "tests broth recipes late into the night"),
    ("accountant", "a small tax office", "helps neighbors sort out their paperwork"),
    ("photographer", "a freelance business", "shoots weddings and the town's festivals"),
    ("social worker", "the family services office", "visits families across town"),
)  # fmt: skip
PROJECTS = (
    "planning a community garden on the empty lot behind the library",
    "organizing a charity run for the children's hospital next month",
    "writing a memoir about growing up near the harbor",
    "training for a half marathon while juggling a full work schedule",
    "collecting signatures to keep the late buses running",
    "learning to play the cello from online videos",
    "restoring an old sailboat in the garage",
    "preparing a photo exhibit about the town's old storefronts",
    "studying for a professional certification exam in the evenings",
    "organizing a potluck dinner for the spring festival",
    "trying to start a neighborhood repair cafe",
    "writing songs for an open-mic night at the pub",
    "researching the history of the old train station",
    "planning a surprise anniversary party for a close friend",
    "campaigning for a seat on the school board",
    "teaching a free coding workshop for teenagers",
    "building a tiny library box for the street corner",
    "looking for a bigger apartment before the lease runs out",
    "practicing for the chess tournament at the community center",
    "setting up a weekly clothing swap at the town hall",
    "drafting a proposal for safer crossings near the school",
    "growing heirloom tomatoes on the balcony",
    "volunteering to rebuild the playground at the riverside park",
    "saving up for a trip to visit family overseas",
)  # fmt: skip
ROUTINES = (
    "works from 8am to 4pm and walks along the river before dinner",
    "opens the shop at 9am, takes a long lunch, and closes at 6pm",
    "starts work at dawn and finishes by early afternoon",
    "spends mornings at work and afternoons on personal projects",
    "works evening shifts from 3pm to 11pm and sleeps in",
    "keeps a strict schedule and reads for an hour before bed",
)
MEMORIES = (
    "You and {other} have been friends since {other_first} moved to town",
    "You lent {other} a ladder {time} and still have not gotten it back",
    "You think {other} talks too much about {topic}",
    "You heard {other} say something worrying about {topic}",
    "You ran into {other} at {place} {time} and chatted about {topic}",
    "You promised {other} to help with a move next weekend",
    "You know {other} as a regular at {place}",
    "You are a little jealous of how easily {other} makes friends",
    "You owe {other} a favor after {other_first} covered your shift",
    "You want to ask {other} for advice about {topic}",
    "You saw a flyer at {place} about {topic}",
    "You read an article about {topic} and found it unsettling",
    "You feel {trait} whenever someone brings up {topic}",
    "You usually stop at {place} on the way home from work",
    "You argued with {other} about {topic} and regret it a little",
    "You think {place} has gotten too crowded lately",
    "You remember when {place} was a quiet spot where nobody went",
    "You admire how {trait} {other} is with newcomers",
    "You and {other} once got lost together on a hike outside town",
    "You keep meaning to visit {place} with {other}",
)  # fmt: skip
OBSERVATIONS = (
    "{first} was seen at {place} {time}, talking with {other} about {topic}.",
    "{first} left a handwritten note on the board at {place} about {topic}.",
    "{first} looks tired but keeps checking a long to-do list.",
    "{first} stopped by {place} and asked around about {topic}.",
    "{first} has been carrying a stack of papers everywhere since {time}.",
    "{first} waved at {other} across the street {time}.",
)  # fmt: skip
UTTERANCES = (
    "I am still {project}, so any help is welcome.",
    "Did anyone else hear about {topic}?",
    "{other_first}, I saw you at {place} {time} and meant to say hello.",
    "Honestly, I have been thinking about {topic} all day.",
    "I think we should all meet at {place} this weekend.",
    "{other_first}, what do you make of {topic}?",
    "I stopped by {place} {time} and it was busier than ever.",
    "Count me in if anyone is organizing something about {topic}.",
    "I agree with {other_first} that {topic} deserves more attention.",
    "My week has been long, but talking to all of you helps.",
    "If anyone needs a hand, you know where to find me.",
    "I will bring some snacks next time we get together at {place}.",
    "Has anyone figured out what is going on with {topic}?",
    "I keep telling {other_first} that {place} is the best spot in town.",
)  # fmt: skip
NEIGHBORS = ("the mail carrier", "old Mr. Hale", "the new neighbor", "a cousin from out of town")


@dataclass(slots=True)
class _Persona:
    first: str
    name: str
    age: int
    traits: list[str]
    job: tuple[str, str, str]
    project: str
    routine: str
    times: tuple[str, str, str]
    memories: list[str]


class _GAScript:
    def __init__(self, rng: random.Random, p: GenParams) -> None:
        self.rng, self.p = rng, p
        self.town = rng.choice(TOWNS)
        names = make_names(rng, p.agents)
        self.ids = [slug(f"{f} {last}") for f, last in names]
        self.people: list[_Persona] = []
        for first, last in names:
            times = (rng.choice(("10pm", "11pm", "midnight")), rng.choice(("6am", "7am", "8am")),
                     rng.choice(("5pm", "6pm", "7pm")))  # fmt: skip
            self.people.append(_Persona(
                first, f"{first} {last}", rng.randint(19, 78), rng.sample(TRAITS, 3),
                rng.choice(OCCUPATIONS), rng.choice(PROJECTS), rng.choice(ROUTINES), times, [],
            ))  # fmt: skip
        for i, per in enumerate(self.people):
            seed_words = int(0.4 * max(0, p.private_words - 170))  # ~170: summary and part 2
            per.memories = fill_sentences(rng, MEMORIES, seed_words, self._ctx(i))

    def _ctx(self, i: int) -> Any:
        others = [q for j, q in enumerate(self.people) if j != i]

        def ctx() -> dict[str, Any]:
            o = self.rng.choice(others) if others else None
            return {
                "first": self.people[i].first, "project": self.people[i].project,
                "other": o.name if o else self.rng.choice(NEIGHBORS),
                "other_first": o.first if o else "neighbor", "place": self.rng.choice(PLACES),
                "topic": self.rng.choice(TOPICS), "time": self.rng.choice(TIMES),
                "trait": self.rng.choice(TRAITS),
            }  # fmt: skip

        return ctx

    def _target(self) -> int:
        w = self.p.shared_words
        return self.rng.randint(max(1, round(0.75 * w)), max(1, round(1.25 * w)))

    def observation(self, i: int) -> str:
        per = self.people[i]
        head = f"{per.name} is {per.project}."
        rest = fill_sentences(
            self.rng, OBSERVATIONS, self._target() - word_count(head), self._ctx(i)
        )
        return "\n" + " ".join([head, *rest])

    def prefix(self, i: int, rnd: int, own_past: list[str]) -> str:
        per, town = self.people[i], self.town
        title, place, activity = per.job
        bed, wake, dinner = per.times
        said = [f'- You said: "{o.split(": ", 1)[1]}"' for o in own_past[-2:]]
        top = (
            f"Context for the task:\n\nPART 1.\nName: {per.name}\nAge: {per.age}\n"
            f"Innate traits: {', '.join(per.traits)}\n"
            f"Learned traits: {per.name} is a {title} at {place} who {activity}.\n"
            f"Currently: {per.name} is {per.project}.\n"
            f"Lifestyle: {per.name} goes to bed around {bed}, wakes up around {wake}, "
            f"and eats dinner around {dinner}.\n"
            f"Daily plan requirement: {per.first} {per.routine}.\n"
            f"Current Date: Tuesday March 7\n\nHere is the memory that is in {per.name}'s head:\n"
            + "".join(f"- {m}\n" for m in per.memories)
        )
        past = (
            f"{per.name} has not talked with the other residents of {town} yet today."
            if rnd == 1
            else f"{per.name} has been chatting with the other residents of {town} for "
            f"{rnd - 1} round{'s' if rnd > 2 else ''}."
        )
        hear = (
            f"{per.name} and the other residents of {town} are about to chat. "
            f"Here is what {per.name} observes around {town}:"
            if rnd == 1
            else f"Here is what the residents of {town} said in the last round:"
        )
        bottom = (
            f"\nPART 2.\nPast Context:\n{past}\n\nCurrent Location: {town}:{place}\n\n"
            f"Current Context:\n{per.name} is taking part in a town-wide chat: in every round "
            f"each resident of {town} shares one short update, and everyone hears every update."
            f"\n\n{hear}"
        )
        fixed = word_count(top) + word_count(bottom) + sum(word_count(x) for x in said)
        budget = self.p.private_words - fixed
        retrieved = fill_sentences(self.rng, MEMORIES, budget, self._ctx(i))
        return (
            top + "".join(f"- {m}\n" for m in retrieved) + "".join(s + "\n" for s in said) + bottom
        )

    def suffix(self, i: int, rnd: int) -> str:
        name, town = self.people[i].name, self.town
        return (
            f"\n\n---\nTask: Given the above, what should {name} say to the other residents of "
            f"{town} next in the conversation? Keep it short and in character.\n\n"
            f"Output format: Output a json of the following format:\n{{\n"
            f'"{name}": "<{name}\'s utterance>",\n'
            f'"Did the conversation end with {name}\'s utterance?": "<json Boolean>"\n}}'
        )

    def output(self, i: int, rnd: int) -> str:
        text = " ".join(fill_sentences(self.rng, UTTERANCES, self._target(), self._ctx(i)))
        return f"\n{self.people[i].name}: {text}"


def generative_agents(
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
    """A synthetic GenerativeAgents All-Gather trace (workload ``generative_agents``).

    ``private_words`` is the approximate word count of each private prefix (never below the
    persona summary, about 120 words), ``shared_words`` the mean utterance length (each one is
    within about +-25%). ``shuffle`` gives every agent its own order of the shared segments in
    every round (distinct within a round); otherwise all agents use the header's agent order.
    """
    params = GenParams(
        agents, rounds, seed, private_words, shared_words, shuffle, max_tokens, arrival_jitter_s
    )
    params.check()
    rng = random.Random(seed)
    script = _GAScript(rng, params)
    return build_allgather(script, params, rng, "generative_agents", script.town)
