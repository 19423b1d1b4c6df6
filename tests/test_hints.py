"""Hint payload validation, separator form and segment-wise tokenization."""

from __future__ import annotations

import pytest

from sglang_tokendance.entry import RoundRegistry
from sglang_tokendance.hints import (
    HintError,
    build_request,
    find_action,
    parse_payload,
    tokenize_segments,
)
from sglang_tokendance.hints_text import build_separated, parse_separated

SEGS = [
    ("private", None, "You are Ann. "),
    ("shared", "r0/bob", "Bob: hi."),
    ("private", None, " Reply:"),
]


def test_build_request_round_trips_through_the_parser() -> None:
    text, env = build_request(SEGS, "r1", 2, "ann")
    assert text == "You are Ann. Bob: hi. Reply:"
    hint = parse_payload(find_action(env), len(text))
    assert [(s.type, s.id, text[s.start : s.end]) for s in hint.segments] == [
        ("private", None, "You are Ann. "),
        ("shared", "r0/bob", "Bob: hi."),
        ("private", None, " Reply:"),
    ]
    assert (hint.round, hint.round_size, hint.agent) == ("r1", 2, "ann")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["segments"][1].update(type="public"), "unknown type 'public'"),
        (lambda p: p["segments"][1].pop("id"), "shared needs an 'id'"),
        (lambda p: p["segments"][2].update(end=999), "out of range"),
        (lambda p: p["segments"][1].update(start=3), "expected 13"),
        (lambda p: p.update(round_size=0), "'round_size' must be an integer >= 1"),
        (lambda p: p.update(agent=""), "'agent' must be a non-empty string"),
        (lambda p: p["segments"].pop(), "spans end at 21"),
    ],
)
def test_malformed_hints_are_refused_with_the_problem_named(mutate, message) -> None:
    text, env = build_request(SEGS, "r1", 2, "ann")
    payload = find_action(env)
    mutate(payload)
    with pytest.raises(HintError, match=message):
        parse_payload(payload, len(text))


def test_unsupported_action_version_is_refused() -> None:
    _, env = build_request(SEGS, "r1", 2, "ann")
    env["actions"][0]["action_version"] = "9"
    with pytest.raises(HintError, match="action_version '9' not supported"):
        find_action(env)


def test_separator_form_parses_to_the_same_hint() -> None:
    text, env = build_request(SEGS, "r1", 2, "ann")
    sep_text = build_separated(SEGS, "r1", 2, "ann", "<|td|>")
    clean, payload = parse_separated(sep_text, "<|td|>")
    assert clean == text
    assert parse_payload(payload, len(clean)) == parse_payload(find_action(env), len(text))
    assert parse_separated("plain prompt", "<|td|>") is None
    with pytest.raises(HintError, match="unknown segment tag"):
        parse_separated("<|td|>round=1;size=2;agent=a<|td|><|td|>@oops<|td|>x", "<|td|>")


def test_segments_are_tokenized_on_their_own() -> None:
    text, env = build_request(SEGS, "r1", 2, "ann")
    hint = parse_payload(find_action(env), len(text))

    def encode(part: str, special: bool) -> list[int]:
        return ([0] if special else []) + [ord(ch) for ch in part]

    ids, hint = tokenize_segments(encode, text, hint)
    assert ids[0] == 0 and len(ids) == len(text) + 1
    shared = hint.segments[1]
    assert ids[shared.tok_start : shared.tok_end] == [ord(c) for c in "Bob: hi."]


def test_registry_refuses_size_mismatch_and_two_texts_under_one_id() -> None:
    reg = RoundRegistry()
    text, env = build_request(SEGS, "r1", 2, "ann")
    reg.check(parse_payload(find_action(env), len(text)), text)
    text2, env2 = build_request(SEGS, "r1", 3, "bob")
    with pytest.raises(HintError, match="round_size 2"):
        reg.check(parse_payload(find_action(env2), len(text2)), text2)
    other = [SEGS[0], ("shared", "r0/bob", "Bob: bye."), SEGS[2]]
    text3, env3 = build_request(other, "r1", 2, "cat")
    with pytest.raises(HintError, match="different text"):
        reg.check(parse_payload(find_action(env3), len(text3)), text3)


def test_registry_forgets_a_round_after_its_ttl() -> None:
    now = [0.0]
    reg = RoundRegistry(ttl_s=10.0, clock=lambda: now[0])
    text, env = build_request(SEGS, "r1", 2, "ann")
    reg.check(parse_payload(find_action(env), len(text)), text)
    other = [SEGS[0], ("shared", "r0/bob", "Bob: bye."), SEGS[2]]
    text3, env3 = build_request(other, "r1", 2, "cat")
    now[0] = 11.0  # a later run reuses the round id with new text
    reg.check(parse_payload(find_action(env3), len(text3)), text3)
