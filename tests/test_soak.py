"""Long runs and loose inputs on the real CPU server, default TokenDance flags (issue 11).

One server (tiny Llama, ``--enable-tokendance`` with its defaults: master policy ``author``,
selection ``both``, ratio 0.15, 2 s round timeout) on a small pool (6,000 tokens), with the
integrity watch on (``TOKENDANCE_CHECK_EVERY_BATCH=1``: a full census after every batch).
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from roundclient import stats

from sglang_tokendance.hints import build_request
from sglang_tokendance.server import ServerProcess
from sglang_tokendance.watch import ENV as WATCH_ENV

POOL = 6000
WORDS = "the a village market river baker smith garden festival morning evening song".split()


@pytest.fixture(scope="module")
def url(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("soak") / "server.log"
    flags = ["--enable-tokendance", "--sleep-on-idle", "--max-total-tokens", str(POOL)]
    srv = ServerProcess(tiny_llama, flags, log_path=log, env={WATCH_ENV: "1"})
    with srv:
        yield srv.url


def _generate(url: str, body: dict[str, Any], path: str = "/generate") -> requests.Response:
    return requests.post(url + path, json=body, timeout=300)


def _idle_checks(url: str) -> dict[str, Any]:
    """The idle server's stats, after asserting what must hold between any two rounds."""
    s = stats(url, settle_s=30)
    assert s["integrity"] == "ok", s["integrity"]
    assert s["watch"]["failures"] == 0, s["watch"]["first"]
    # nothing runs, so nothing may be protected: every slot is free or evictable
    assert s["store"]["protected_tokens"] == 0 and s["store"]["radix_protected_tokens"] == 0
    assert s["held_requests"] == 0
    return s


def test_closed_loop_soak_under_the_default_policy(url: str) -> None:
    """30 rounds of 8 agents; each prompt holds the other agents' previous outputs, wrapped."""
    names = [f"cl{i}" for i in range(8)]
    outs = {a: f"{a} walks to the market." for a in names}

    def one(r: int, agent: str) -> tuple[str, str]:
        segs = [("private", None, f"You are {agent}, who likes topic {names.index(agent)}. ")]
        segs += [("shared", f"cl{r}/{b}", f"{b} said: {outs[b]} ") for b in names if b != agent]
        segs.append(("private", None, f"What does {agent} say next?"))
        text, hints = build_request(segs, f"cl{r}", len(names), agent)
        params = {"max_new_tokens": 24, "temperature": 0}
        res = _generate(url, {"text": text, "kv_hints": hints, "sampling_params": params})
        assert res.status_code == 200, res.text
        return agent, res.json()["text"]

    before = stats(url)
    checks = before["watch"]["checks"]
    for r in range(30):
        with ThreadPoolExecutor(len(names)) as ex:
            outs = dict(ex.map(lambda a, r=r: one(r, a), names))
        s = _idle_checks(url)
    assert s["watch"]["checks"] > checks + 30  # the census ran on every batch of the soak
    assert s["author_masters_used"] > before["author_masters_used"]  # outputs were re-used
    assert s["rounds"] - before["rounds"] >= 30
    assert requests.get(url + "/health", timeout=30).status_code == 200


def test_agents_that_never_return_leave_nothing_protected(url: str) -> None:
    """Rounds of 16 new agents each on a small pool; a hint-less prompt is answered meanwhile."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    plain: dict[str, requests.Response] = {}
    for r in range(3):
        shared = [(f"gone{r}/s{k}", words(110) + ". ") for k in range(8)]
        names = [f"gone{r}a{i}" for i in range(16)]
        bodies = []
        for i, name in enumerate(names):
            order = shared[i % 8 :] + shared[: i % 8]
            segs = [("private", None, f"You are {name}. {words(95)}. ")]
            segs += [("shared", sid, t) for sid, t in order]
            segs.append(("private", None, words(100) + "?"))
            text, hints = build_request(segs, f"gone{r}", len(names), name)
            params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
            bodies.append({"text": text, "kv_hints": hints, "sampling_params": params})
        side = None
        if r == 2:  # a plain request while the round runs
            body = {"text": words(1000), "sampling_params": {"max_new_tokens": 8}}
            side = threading.Thread(target=lambda b=body: plain.update(res=_generate(url, b)))
            side.start()
        with ThreadPoolExecutor(len(bodies)) as ex:
            answers = list(ex.map(lambda b: _generate(url, b), bodies))
        if side is not None:
            side.join()
        assert [a.status_code for a in answers] == [200] * 16, answers[0].text
        assert all(len(a.json()["output_ids"]) == 32 for a in answers)
        _idle_checks(url)
    assert plain["res"].status_code == 200


def _hinted(round_id: str, agent: str) -> tuple[str, dict[str, Any]]:
    segs = [("private", None, f"{agent} is here. "), ("shared", "s", "the shared block of text")]
    return build_request(segs, round_id, 2, agent)


def _assert_one_sentence(res: requests.Response, *needles: str) -> None:
    assert res.status_code == 400, res.text
    body = res.json()
    msg = body.get("message") or body.get("error", {}).get("message")
    assert isinstance(msg, str) and "\n" not in msg and "validation error" not in msg, body
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_unsupported_protocol_version_is_refused(url: str, path: str) -> None:
    text, hints = _hinted(f"pv{path}", "ann")
    hints["protocol_version"] = "2"
    if path == "/generate":
        body: dict[str, Any] = {"text": text, "kv_hints": hints}
    elif path == "/v1/completions":
        body = {"model": "m", "prompt": text, "kv_hints": hints, "max_tokens": 2}
    else:
        msgs = [{"role": "user", "content": text}]
        body = {"model": "m", "messages": msgs, "kv_hints": hints, "max_tokens": 2}
    _assert_one_sentence(_generate(url, body, path), "protocol_version '2'")
    _assert_serving(url)


def test_bad_spans_and_hint_shapes_get_one_sentence(url: str) -> None:
    text, hints = _hinted("shape", "bea")
    bad = copy.deepcopy(hints)
    bad["actions"][0]["payload"]["segments"][0]["start"] = False
    _assert_one_sentence(_generate(url, {"text": text, "kv_hints": bad}), "must be integers")
    res = _generate(url, {"text": text, "kv_hints": "round 3"})
    _assert_one_sentence(res, "kv_hints must be a JSON object", "got a string")
    _assert_one_sentence(_generate(url, {"text": ""}), "prompt is empty")
    _assert_serving(url)


def test_the_same_agent_twice_in_a_round_is_refused_while_the_first_runs(url: str) -> None:
    text, hints = _hinted("twice", "cid")
    # planned at arrival, the first runs at once: long enough to still run when the second
    # comes (an agent's request of a round is refused while the first is held or running)
    sampling = {"max_new_tokens": 400, "ignore_eos": True}
    body = {"text": text, "kv_hints": hints, "sampling_params": sampling}
    before = stats(url)
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(_generate, url, body)
        time.sleep(0.3)
        second = ex.submit(_generate, url, body)
        answers = [first.result(), second.result()]
    assert sorted(a.status_code for a in answers) == [200, 400]
    refused = next(a for a in answers if a.status_code == 400)
    _assert_one_sentence(refused, "agent 'cid' already has a request in round 'twice'")
    retry = _generate(url, body)  # after the first finished: a retry, run as a late arrival
    assert retry.status_code == 200, retry.text
    s = stats(url)
    assert s["retries"] == before["retries"] + 1
    assert s["integrity"] == "ok"


def _assert_serving(url: str) -> None:
    res = _generate(url, {"text": "still here", "sampling_params": {"max_new_tokens": 2}})
    assert res.status_code == 200, res.text
    assert stats(url)["integrity"] == "ok"
