"""GPU check of the position-tagged Triton kernels: correctness vs the torch reference, and
the cost of the fused delta rotation (the same kernel with ``ROTATE`` compiled out).

Needs only torch + triton (no SGLang). On a machine without CUDA it prints a skip note and
exits 0, unless ``--interpret`` is given with ``TRITON_INTERPRET=1`` (a tiny dry run of the whole
script on CPU, for checking the script itself).

Workload (defaults: batch 16, seq 2048, 32 heads / 8 KV heads, head_dim 128): half the rows
are laid out like TokenDance rows (``--all-laid-out``: all), the other half are ordinary::

    laid-out row:  [private prefix 1/8 | master slots (--reused, 5/8), shuffled, delta != 0 |
                    fresh: the rest]
    extend:        the last ``--extend`` entries of every row (positions from req_to_pos)
    decode:        one query per row at position seq_len - 1

Output: a JSON file (``--out``) and a short table printed last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("benchmarks.kernels")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"fp16": 1e-2, "bf16": 3e-2, "fp32": 1e-4}
EXTEND_CONFIGS = [
    dict(block_m=16, block_n=64, num_warps=4, num_stages=2),
    dict(block_m=16, block_n=32, num_warps=4, num_stages=2),
    dict(block_m=32, block_n=64, num_warps=8, num_stages=2),
]
DECODE_CONFIGS = [
    dict(block_n=64, num_warps=4, num_splits=8, num_stages=2),
    dict(block_n=32, num_warps=4, num_splits=16, num_stages=2),
]


class Batch(NamedTuple):
    """Pools and position tables for one benchmark batch (see the module docstring)."""

    k: torch.Tensor
    v: torch.Tensor
    req_to_token: torch.Tensor
    req_to_pos: torch.Tensor
    layout_len: torch.Tensor
    slot_pos: torch.Tensor
    rows: torch.Tensor
    seq_lens: torch.Tensor
    ext_lens: torch.Tensor
    query_pos: torch.Tensor


def make_batch(args: argparse.Namespace, dtype: torch.dtype, device: str, seed: int) -> Batch:
    """Build the batch on ``device`` (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    b, s, e = args.batch, args.seq, args.extend
    num_slots = b * s + 1
    k = torch.randn(num_slots, args.kv_heads, args.head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, args.kv_heads, args.head_dim, generator=g).to(dtype)
    r2t = torch.zeros(b + 1, s, dtype=torch.int32)
    r2p = torch.zeros(b + 1, s, dtype=torch.int32)
    layout_len = torch.zeros(b + 1, dtype=torch.int32)
    slot_pos = torch.zeros(num_slots, dtype=torch.int32)
    slots = (torch.randperm(num_slots - 1, generator=g) + 1).int().view(b, s)
    qpos = []
    for i in range(b):
        row = i + 1
        r2t[row] = slots[i]
        kpos = torch.arange(s)
        if i % 2 == 0 or args.all_laid_out:  # laid-out row: shuffled master block, fresh tail
            m = int(round(args.reused * s))
            p = max(0, min(s // 8, s - m - e))  # private prefix, if room is left for it
            kpos = torch.cat(
                [
                    kpos[:p],
                    kpos[p : p + m][torch.randperm(m, generator=g)],
                    kpos[p + m :][torch.randperm(s - p - m, generator=g)],
                ]
            )
            r2p[row] = kpos.int()
            layout_len[row] = s
            written = kpos.clone()
            written[p : p + m] += torch.randint(-s, s, (m,), generator=g)  # master's own positions
            slot_pos[slots[i].long()] = written.clamp(min=0).int()
        else:
            slot_pos[slots[i].long()] = kpos.int()
        qpos.append(kpos[s - e :])
    dev = lambda t: t.to(device)  # noqa: E731
    return Batch(
        dev(k),
        dev(v),
        dev(r2t),
        dev(r2p),
        dev(layout_len),
        dev(slot_pos),
        dev(torch.arange(1, b + 1, dtype=torch.int32)),
        dev(torch.full((b,), s, dtype=torch.int32)),
        dev(torch.full((b,), e, dtype=torch.int32)),
        dev(torch.cat(qpos)),
    )


def timed(fn: Any, device: str, warmup: int, repeats: int) -> list[float]:
    """Wall times (ms) of ``fn()`` after warm-up, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def best_config(fn: Any, configs: list[dict], device: str, args: argparse.Namespace) -> tuple:
    """(median ms, spread ms, config) of the fastest launch config for ``fn(**config)``."""
    best = None
    for cfg in configs:
        ts = timed(lambda cfg=cfg: fn(**cfg), device, args.warmup, args.repeats)
        med = statistics.median(ts)
        if best is None or med < best[0]:
            best = (med, max(ts) - min(ts), cfg)
    return best


def check_and_time(
    kernel: Any,
    ref: Any,
    kargs: tuple,
    extra: dict,
    configs: list[dict],
    device: str,
    args: argparse.Namespace,
) -> dict:
    """Max error of ``kernel`` vs ``ref``, and its best time with and without the rotation."""
    want = ref(*kargs).float()
    got = kernel(*kargs, **configs[0], **extra).float()
    row: dict[str, Any] = dict(max_abs_err=float((got - want).abs().max()))
    for rotate in (True, False):

        def launch(rotate: bool = rotate, **cfg: Any) -> Any:
            return kernel(*kargs, rotate=rotate, **cfg, **extra)

        med, spread, cfg = best_config(launch, configs, device, args)
        key = "rotate" if rotate else "no_rotate"
        row.update({f"{key}_ms": med, f"{key}_spread_ms": spread, f"{key}_config": cfg})
    row["overhead_pct"] = 100.0 * (row["rotate_ms"] / row["no_rotate_ms"] - 1.0)
    return row


def run(args: argparse.Namespace, device: str) -> dict:
    """Check and time both kernels for every dtype; returns the JSON document."""
    from sglang_tokendance.attention.reference import decode_attention_ref, extend_attention_ref
    from sglang_tokendance.attention.rope import RopeParams
    from sglang_tokendance.attention.triton_ops import decode_attention, extend_attention

    rope = RopeParams.default(args.theta, args.head_dim).to(device)
    scale = args.head_dim**-0.5
    results = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        bt = make_batch(args, dtype, device, args.seed)
        g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        q = torch.randn(args.batch * args.extend, args.heads, args.head_dim, generator=g)
        qd = torch.randn(args.batch, args.heads, args.head_dim, generator=g)
        q, qd = q.to(device, dtype), qd.to(device, dtype)
        common = (
            bt.k,
            bt.v,
            bt.req_to_token,
            bt.req_to_pos,
            bt.layout_len,
            bt.slot_pos,
            bt.rows,
            bt.seq_lens,
        )
        ext_args = (q, *common, bt.ext_lens, bt.query_pos, rope, scale)
        dec_args = (qd, *common, rope, scale)
        for kind, kernel, ref, kargs, configs, extra in (
            ("extend", extend_attention, extend_attention_ref, ext_args, EXTEND_CONFIGS,
             dict(max_extend_len=args.extend)),
            ("decode", decode_attention, decode_attention_ref, dec_args, DECODE_CONFIGS, {}),
        ):  # fmt: skip
            row = check_and_time(kernel, ref, kargs, extra, configs[: args.configs], device, args)
            row = dict(kernel=kind, dtype=name, ok=row["max_abs_err"] <= TOL[name], **row)
            results.append(row)
            logger.info("%s", row)
    return dict(
        device=_device_name(device),
        args=vars(args),
        results=results,
        ok=all(r["ok"] for r in results),
    )


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (triton interpreter)"


def table(doc: dict) -> str:
    lines = [
        f"device: {doc['device']}",
        f"{'kernel':8} {'dtype':5} {'rotate ms':>10} {'no-rot ms':>10} {'overhead':>9} "
        f"{'max err':>9}  ok",
    ]
    for r in doc["results"]:
        lines.append(
            f"{r['kernel']:8} {r['dtype']:5} {r['rotate_ms']:10.3f} "
            f"{r['no_rotate_ms']:10.3f} {r['overhead_pct']:8.1f}% "
            f"{r['max_abs_err']:9.2e}  {'yes' if r['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--extend", type=int, default=512)
    ap.add_argument(
        "--reused",
        type=float,
        default=0.625,
        help="share of a laid-out row's keys that are master slots at shifted positions",
    )
    ap.add_argument(
        "--all-laid-out", action="store_true", help="every row laid out (default: every other)"
    )
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--theta", type=float, default=500000.0)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--configs", type=int, default=3, help="launch configs tried per kernel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check/kernels.json"))
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="without CUDA, dry-run on CPU (needs TRITON_INTERPRET=1; tiny sizes)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        device = "cuda"
    elif args.interpret and os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        print(
            "no CUDA: skipping the Triton kernel check (the CPU tests cover correctness in "
            "the interpreter)"
        )
        return 0
    t0 = time.perf_counter()
    doc = run(args, device)
    doc["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {args.out}")
    print(table(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
