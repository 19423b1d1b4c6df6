"""Decode attention of one all-gather round on the CPU torch path: rows vs shared.

``rows`` (:func:`sglang_tokendance.attention.batch_exec.decode_batch`) gathers and rotates
every row's keys; ``shared`` (:mod:`sglang_tokendance.attention.shared_decode`) reads the keys
several rows hold once for the batch and rotates each row's query instead. Both run on the same
synthetic round, built the way the collector lays rows out::

    row r: [private prefix | masters 0..M-1 in the row's own order | private suffix]
           master m was written at its master agent's positions; each row replaces a few of
           its master slots by its own mirror slots (kept recomputed tokens)

Per decode step and layer, median over repeats, and the two outputs' largest difference.
Output: one summary line, a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_tokendance.attention import batch_exec as bx  # noqa: E402
from sglang_tokendance.attention import batch_plan as bp  # noqa: E402
from sglang_tokendance.attention import shared_decode as sd  # noqa: E402
from sglang_tokendance.attention.rope import RopeParams  # noqa: E402

logger = logging.getLogger("benchmarks.decode_paths")


class RoundBatch(NamedTuple):
    """KV buffers, the position tables and the decode batch of one synthetic round."""

    k: torch.Tensor
    v: torch.Tensor
    tables: bp.Tables
    rows: torch.Tensor
    seq_lens: list[int]


def make_round(
    rows: int,
    master_lens: list[int],
    kv_heads: int,
    head_dim: int,
    mirrors: int = 2,
    prefix: int = 5,
    tail: int = 4,
    twice: int | None = None,
    seed: int = 0,
) -> RoundBatch:
    """A round of ``rows`` agents over ``len(master_lens)`` masters (see the module doc).

    Row 1 is the master agent (its masters at its own positions, delta 0); row ``r`` has a
    private prefix of ``prefix + 3 r`` keys, ``mirrors`` mirror slots, ``tail`` private keys
    after the masters. ``twice``: that row (1-based) holds master 0 a second time.
    """
    g = torch.Generator().manual_seed(seed)
    per_row = prefix + 3 * rows + mirrors + tail
    slots = 1 + sum(master_lens) + rows * per_row + rows + 8  # + room for decode steps
    k = torch.randn(slots, kv_heads, head_dim, generator=g)
    v = torch.randn(slots, kv_heads, head_dim, generator=g)
    spos = torch.zeros(slots, dtype=torch.int32)
    ctx = per_row + 2 * sum(master_lens) + 64
    r2t = torch.zeros(rows + 1, ctx, dtype=torch.int32)
    r2p = torch.zeros(rows + 1, ctx, dtype=torch.int32)
    ll = torch.zeros(rows + 1, dtype=torch.int32)
    nxt = 1 + sum(master_lens)
    masters, start = [], 1
    for n in master_lens:
        masters.append(list(range(start, start + n)))
        start += n
    seq: list[int] = []
    for r in range(1, rows + 1):
        own = prefix + 3 * r
        order = torch.randperm(len(master_lens), generator=g).tolist()
        if twice == r:
            order.append(0)
        ids, pos = list(range(nxt, nxt + own)), list(range(own))
        nxt += own
        p = own
        for m in order:
            ids += masters[m]
            pos += list(range(p, p + master_lens[m]))
            if r == 1:  # the master agent wrote its masters where it holds them
                spos[masters[m]] = torch.arange(p, p + master_lens[m], dtype=torch.int32)
            p += master_lens[m]
        for col in torch.randperm(len(ids) - own, generator=g)[:mirrors].tolist():
            ids[own + col] = nxt  # a mirror slot: written at the row's position
            nxt += 1
        ids += list(range(nxt, nxt + tail))
        pos += list(range(p, p + tail))
        nxt += tail
        ids_t, pos_t = torch.tensor(ids), torch.tensor(pos, dtype=torch.int32)
        private = ids_t > sum(master_lens)
        spos[ids_t[private]] = pos_t[private]
        n = len(ids)
        r2t[r, :n] = ids_t.to(torch.int32)
        r2p[r, :n] = pos_t
        ll[r] = n
        seq.append(n)
    assert nxt <= slots - rows, "slot budget of the synthetic round"
    return RoundBatch(k, v, bp.Tables(r2t, r2p, ll, spos), torch.arange(1, rows + 1), seq)


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both paths on one round; returns the JSON document."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rope = RopeParams.default(args.theta, args.head_dim)
    mirrors = round(args.mirror_share * args.masters * args.master_len)
    w = make_round(
        args.rows, [args.master_len] * args.masters, args.kv_heads, args.head_dim, mirrors,
        prefix=args.prefix, seed=args.seed,
    )  # fmt: skip
    q = torch.randn(args.rows, args.heads, args.head_dim)
    rows_plan = bp.plan_batch(w.rows, w.seq_lens, w.tables, rope, bp.DECODE_HEADROOM, sort=True)
    groups = bx.decode_groups(rows_plan, w.k)
    shared = sd.plan_shared(w.rows, w.seq_lens, w.tables, rope)
    if shared is None:
        raise ValueError("the round shares too little for the shared path (fewer masters?)")
    ws_r, ws_s = bx.Workspace(), bx.Workspace()

    def by_rows() -> torch.Tensor:
        return bx.decode_batch(q, w.k, w.v, rows_plan, rope, 0.25, ws_r, groups)

    def by_shared() -> torch.Tensor:
        return sd.shared_decode(q, w.k, w.v, shared, rope, 0.25, ws_s)

    diff = float((by_rows() - by_shared()).abs().max())
    for _ in range(args.warmup):
        by_rows(), by_shared()
    rounds = []
    for _ in range(args.rounds):  # interleaved: the two paths see the same machine state
        rounds.append({"rows_ms": _median_ms(by_rows, args.repeats)})
        rounds[-1]["shared_ms"] = _median_ms(by_shared, args.repeats)
    ratios = [r["rows_ms"] / r["shared_ms"] for r in rounds]
    plan_ms = {
        "rows": _median_ms(
            lambda: bp.plan_batch(w.rows, w.seq_lens, w.tables, rope, bp.DECODE_HEADROOM, True),
            3,
        ),
        "shared": _median_ms(lambda: sd.plan_shared(w.rows, w.seq_lens, w.tables, rope), 3),
    }
    keys = sum(w.seq_lens)
    return {
        "benchmark": "decode_paths",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "keys": keys,
        "shared_keys": shared.shared_keys,
        "shared_share": round(shared.shared_keys / keys, 4),
        "tiles": shared.tiles,
        "max_abs_diff": diff,
        "per_layer_ms": rounds,
        "rows_over_shared": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "plan_build_ms": plan_ms,
    }


def main(argv: list[str] | None = None) -> int:
    """Run, write ``--out``, print one summary line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="agents decoding together")
    ap.add_argument("--masters", type=int, default=64, help="shared segments per prompt")
    ap.add_argument("--master-len", type=int, default=50)
    ap.add_argument("--prefix", type=int, default=300, help="private prefix (+3 per row)")
    ap.add_argument("--mirror-share", type=float, default=0.07, help="mirror slots kept")
    ap.add_argument("--heads", type=int, default=4, help="defaults: the tiny model")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--theta", type=float, default=10000.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/decode_paths.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    doc = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    r = doc["rows_over_shared"]
    med = statistics.median
    logger.info(
        "decode_paths: %d rows x %d keys (%.0f%% shared): rows %.2f ms, shared %.2f ms a "
        "layer: rows/shared %.2fx [%.2f-%.2f], max |diff| %.1e -> %s",
        args.rows, doc["keys"] // args.rows, 100 * doc["shared_share"],
        med(x["rows_ms"] for x in doc["per_layer_ms"]),
        med(x["shared_ms"] for x in doc["per_layer_ms"]),
        r["median"], r["min"], r["max"], doc["max_abs_diff"], args.out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
