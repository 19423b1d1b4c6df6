"""N agents chat for R All-Gather rounds in an SGLang frontend program, with TokenDance hints.

Every round one ``sgl.function`` run forks one state per agent: a common town prefix, the
agent's persona and memory of what it said (private), every other agent's last utterance
(shared segments ``r<r-1>/<agent>``, each agent in its own order), and the agent's
instruction (private); then one ``sgl.gen`` per agent, all in flight together, with the round
id ``<run id>-r<r>`` in their hints (unique per run). The generations go through
:class:`~sglang_tokendance.frontend.TokenDanceEndpoint`, which attaches the hints.

    python examples/frontend_agents.py [--url URL] [--agents 4] [--rounds 3] [--record FILE]

Without ``--url`` an embedded CPU server (tiny Llama, TokenDance on) is started and stopped.
``--record FILE`` writes what was sent and generated as a tokendance-trace (replayable with
``python -m sglang_tokendance.replay FILE``).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence

import sglang as sgl

from sglang_tokendance.frontend import TokenDanceEndpoint, all_gather_round, begin_round
from sglang_tokendance.trace.recorder import TraceRecorder
from sglang_tokendance.trace.validate import validate_trace

NAMES = [
    "Amara Okafor",
    "Bastian Lindqvist",
    "Chiara Nakamura",
    "Dmitri Haddad",
    "Elena Moreau",
    "Farid Castillo",
    "Greta Patel",
    "Hiroshi Brennan",
    "Imani Silva",
    "Jonas Yilmaz",
]
JOBS = [
    "baker",
    "librarian",
    "nurse",
    "carpenter",
    "bus driver",
    "florist",
    "mechanic",
    "chemistry teacher",
    "barista",
    "park ranger",
]
TOWN = "Maple Hollow"


def agent_id(name: str) -> str:
    return name.lower().replace(" ", "_")


@sgl.function
def town_round(s, agents, personas, said, outputs, prev_round, round_id, max_tokens):  # noqa: ANN001
    """One All-Gather round: fork per agent, gather last round's outputs, generate."""
    s += f"A town-wide chat in {TOWN}. Every resident shares one short update per round.\n"
    forks = s.fork(len(agents))
    try:
        for f, a in zip(forks, agents, strict=True):
            f += personas[a]
            f += "".join(f'- You said: "{x}"\n' for x in said[a][-2:])
            f += "Here is what the other residents said in the last round:"
        # Each agent hears the others in its own (rotated) order: shared text at other offsets.
        all_gather_round(
            forks,
            outputs,
            prev_round,
            agents=agents,
            include_own=False,
            order=lambda i, names: names[i % len(names) :] + names[: i % len(names)],
        )
        begin_round(forks, agents, round_id)
        for f, a in zip(forks, agents, strict=True):
            f += f"\n\nWhat does {personas[a].splitlines()[0][6:]} say next?\nAnswer:"
            f += sgl.gen("say", max_tokens=max_tokens, temperature=0)
        forks.join()
    finally:  # stop the forks' worker threads even if something failed
        for f in forks.states:
            f.stream_executor.end()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="SGLang server (default: start an embedded CPU server)")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--record", metavar="FILE", help="write a tokendance-trace of the run")
    ap.add_argument("--run-id", default=uuid.uuid4().hex[:6], help="prefix of the round ids")
    args = ap.parse_args(argv)
    if not 2 <= args.agents <= len(NAMES):
        ap.error(f"--agents must be in 2..{len(NAMES)}")
    if args.url:
        return run(args, args.url)
    from sglang_tokendance.server import ServerProcess

    print("starting embedded SGLang server ...", file=sys.stderr, flush=True)
    with ServerProcess(extra_args=["--enable-tokendance"]) as srv:
        return run(args, srv.url)


def run(args: argparse.Namespace, url: str) -> int:
    names = NAMES[: args.agents]
    agents = [agent_id(n) for n in names]
    full = dict(zip(agents, names, strict=True))
    personas = {a: f"Name: {full[a]}\nJob: {JOBS[i]} in {TOWN}.\n" for i, a in enumerate(agents)}
    # One simulation, one routing key: every round lands where the last one's masters are.
    endpoint = TokenDanceEndpoint(url, group=f"town-{args.run_id}")
    rec = TraceRecorder(
        workload="frontend_town_chat",
        source="examples/frontend_agents.py",
        agents=agents,
        header_extra={"town": TOWN},
    )
    outputs = {a: f"\n{full[a]} arrives at the town square." for a in agents}
    said: dict[str, list[str]] = {a: [] for a in agents}
    for r in range(1, args.rounds + 1):
        n_before = len(endpoint.history)
        round_id = f"{args.run_id}-r{r}"  # unique per run: the server checks a round's texts
        town_round.run(
            agents,
            personas,
            said,
            outputs,
            f"r{r - 1}",
            round_id,
            args.max_tokens,
            backend=endpoint,
        )
        done = len(endpoint.history) - n_before
        if done != len(agents):
            print(
                f"error: {len(agents) - done} of {len(agents)} generations of round {r} failed "
                "(see the warnings above)",
                file=sys.stderr,
            )
            return 1
        outputs = {}
        for g in endpoint.history[n_before:]:
            text = g.output.strip()
            said[g.agent].append(text)
            outputs[g.agent] = f"\n{full[g.agent]}: {text}"
            rec.add(
                r,
                g.agent,
                g.segments,
                g.max_tokens,
                outputs[g.agent],
                cached_tokens=g.meta_info.get("cached_tokens"),
            )
        outputs = {a: outputs[a] for a in agents}  # header order
        print(f"round {r}:")
        for a in agents:
            print(f"  {outputs[a].strip()}")
    shared = sum(1 for g in endpoint.history for s in g.segments if s[0] == "shared")
    print(f"{len(endpoint.history)} hinted generations, {shared} shared segments sent")
    if args.record:
        rec.write(args.record)
        errors = validate_trace(args.record)
        print(f"recorded {args.record}: {'valid' if not errors else errors[0]}")
        return 1 if errors else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
