"""TokenDance hints on the OpenAI-compatible routes, with the real server and the openai client
(the shared test server has the OpenAI-route hooks installed: see test_replay_shared.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from test_replay_shared import shared_server

from sglang_tokendance.hints import HintError, build_request
from sglang_tokendance.openai_compat import map_chat_spans

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooked_server(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    return shared_server(request, tiny_llama, tmp_path_factory)


def run_example(url: str, route: str, round_id: str) -> str:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "openai_agents.py"),
        "--url",
        url,
        "--agents",
        "3",
        "--route",
        route,
        "--round-id",
        round_id,
        "--max-tokens",
        "4",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.server
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_openai_client_example(hooked_server: str, route: str) -> None:
    out = run_example(hooked_server, route, f"oa-{route}")
    lines = [x for x in out.splitlines() if x.startswith("  ")]
    assert len(lines) == 3 and all("(prompt tokens " in x for x in lines)
    stats = requests.get(hooked_server + "/tokendance/stats", timeout=30)
    if stats.status_code == 200:  # the server saw the hints (the round and all its agents)
        assert f"server: round oa-{route} seen with 3 hinted agents" in out


@pytest.mark.server
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_malformed_kv_hints_are_rejected(hooked_server: str, route: str) -> None:
    body: dict = {"model": "m", "max_tokens": 2, "kv_hints": {"protocol_version": "1"}}
    if route == "completions":
        body["prompt"] = "hello there"
    else:
        body["messages"] = [{"role": "user", "content": "hello there"}]
    r = requests.post(f"{hooked_server}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "kv_hints" in r.text
    _, env = build_request([("private", None, "hello "), ("shared", "s", "there")], "x", 1, "a")
    env["actions"][0]["payload"]["segments"][1]["end"] = 99  # spans past the text
    r = requests.post(f"{hooked_server}/v1/{route}", json={**body, "kv_hints": env}, timeout=60)
    assert r.status_code == 400 and "TokenDance hint" in r.text, r.text
    del body["kv_hints"]  # and without hints the route is plain SGLang
    assert requests.post(f"{hooked_server}/v1/{route}", json=body, timeout=60).status_code == 200


def test_map_chat_spans() -> None:
    contents = ["You are A.\n", "News: X\nNews: Y\nSay:"]
    segs = [
        ("private", None, "You are A.\n"),
        ("private", None, "News: "),
        ("shared", "r0/x", "X\n"),
        ("private", None, "News: Y\nSay:"),
    ]
    _, env = build_request(segs, "r1", 2, "a")
    prompt = "<s>sys\n" + contents[0] + "</s><s>user\n" + contents[1] + "</s><s>assistant\n"
    payload = map_chat_spans(env["actions"][0]["payload"], contents, prompt)
    spans = payload["segments"]
    assert spans[0]["start"] == 0 and spans[-1]["end"] == len(prompt)
    assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:], strict=False))
    shared = [s for s in spans if s["type"] == "shared"]
    assert [prompt[s["start"] : s["end"]] for s in shared] == ["X\n"]
    bad = [("private", None, "You are A."), ("shared", "s", "\nNews"), ("private", None, ": X")]
    _, env = build_request(bad, "r1", 2, "a")
    with pytest.raises(HintError, match="crosses"):
        map_chat_spans(env["actions"][0]["payload"], ["You are A.\n", "News: X"], prompt)
    with pytest.raises(HintError, match="changed"):
        map_chat_spans(env["actions"][0]["payload"], ["You are B.\n", "News: X"], prompt)
