"""The text-separator form of a TokenDance hint, for clients that can send only a prompt.

An OpenAI-style client that cannot add ``kv_hints`` to its request writes the hint into the
prompt itself::

    SEP round=R;size=N;agent=A[;group=G] SEP  SEP@private SEP text  SEP@shared:ID SEP text ...

The entry hook (``entry.py``) parses it on every route, removes the separators and headers, and
hands the payload to :func:`.hints.parse_payload` like a structured hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sglang_tokendance.hints import HintError, require_hint


def build_separated(
    segments: Sequence[tuple[str, str | None, str]],
    round_id: str | int,
    round_size: int,
    agent: str,
    sep: str,
    group: str | None = None,
) -> str:
    """The same request as plain text for text-only clients.

    Layout: ``SEP round=R;size=N;agent=A[;group=G] SEP`` then each segment as
    ``SEP@shared:ID SEP text`` or ``SEP@private SEP text``. The separators and headers are
    removed by the server.
    """
    head = f"round={round_id};size={round_size};agent={agent}"
    if group is not None:
        head += f";group={group}"
    out = [f"{sep}{head}{sep}"]
    for typ, sid, seg_text in segments:
        tag = f"@shared:{sid}" if typ == "shared" else "@private"
        out.append(f"{sep}{tag}{sep}{seg_text}")
    return "".join(out)


def parse_separated(text: str, sep: str) -> tuple[str, dict[str, Any]] | None:
    """Parse the separator form; None if ``text`` does not start with a TokenDance header.

    Returns:
        ``(clean_text, payload)`` ready for :func:`parse_payload`.

    Raises:
        HintError: if the header or a segment tag is malformed.
    """
    if not text.startswith(sep):
        return None
    parts = text.split(sep)
    # "", header, "", tag1, text1, "", tag2, text2, ...  -> after the header, (tag, text) pairs
    require_hint(
        len(parts) >= 3 and parts[2] == "",
        "separator header must be SEP round=..;size=..;agent=.. SEP",
    )
    fields = dict(kv.split("=", 1) for kv in parts[1].split(";") if "=" in kv)
    require_hint({"round", "size", "agent"} <= set(fields), "header needs round=, size= and agent=")
    try:
        size = int(fields["size"])
    except ValueError:
        raise HintError(
            f"invalid TokenDance hint: size={fields['size']!r} is not an integer"
        ) from None
    body = parts[3:]
    require_hint(
        len(body) % 2 == 0 and body,
        "each segment must be SEP@shared:ID SEP text or SEP@private SEP text",
    )
    segs, clean, pos = [], [], 0
    for j in range(0, len(body), 2):
        tag, seg_text = body[j], body[j + 1]
        if tag == "@private":
            seg = {"type": "private"}
        elif tag.startswith("@shared:") and len(tag) > len("@shared:"):
            seg = {"type": "shared", "id": tag[len("@shared:") :]}
        else:
            raise HintError(f"invalid TokenDance hint: unknown segment tag {tag!r}")
        if not seg_text:
            continue
        seg.update(start=pos, end=pos + len(seg_text))
        segs.append(seg)
        clean.append(seg_text)
        pos += len(seg_text)
    payload = {
        "round": fields["round"],
        "round_size": size,
        "agent": fields["agent"],
        "segments": segs,
    }
    if "group" in fields:
        payload["group"] = fields["group"]
    return "".join(clean), payload
