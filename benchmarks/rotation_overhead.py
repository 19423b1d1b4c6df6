"""CPU cost of position-tagged attention: TokenDanceAttnBackend's torch path vs torch_native.

One batch on real SGLang pools (ReqToTokenPool, MHATokenToKVPool) and one attention layer. Every
row of the batch is laid out (a random permutation of positions) and its prefix slots were
"written" at other positions (random deltas; ``--shifted-fraction`` of them, default all), so
the TokenDance path rotates those keys and masks every key by position. The same batch runs
through four variants, interleaved repeat by repeat:

    native       TorchNativeAttnBackend (ignores the position tables)
    tokendance   TokenDanceAttnBackend, rows laid out: gather + rotate by delta + masked SDPA
    td_no_delta  TokenDanceAttnBackend, rows laid out but every delta 0: the same path without
                 the rotation (so tokendance / td_no_delta is the rotation's own cost)
    td_plain     TokenDanceAttnBackend, layouts cleared: its fast path (torch_native's code)

for extend (the last ``--extend`` tokens of each row) and decode (one token per row). A forward
runs ``--layers`` attention layers (per-row key plans are computed once per forward).
Note that torch_native's extend attends over seq x seq query rows (prefix rows wasted) while the
TokenDance path computes only the extend rows with an explicit mask.

Output: JSON (``--out``) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before sglang: the CPU rope/kernel path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(args: argparse.Namespace) -> SimpleNamespace:
    """Pools, backends, layer, and the laid-out batch (deterministic for ``--seed``)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang_tokendance.attention.backend import TokenDanceAttnBackend

    from sglang_tokendance.positions import get_position_table

    dtype = getattr(torch, args.dtype)
    b, s, hd = args.batch, args.seq, args.head_dim
    model = torch.nn.Module()
    model.rotary_emb = get_rope(hd, hd, 4 * s, args.theta, True, None, dtype)
    r2t = ReqToTokenPool(size=b, max_context_len=s + 1, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(
        size=b * (s + 1),
        page_size=1,
        dtype=dtype,
        head_num=args.kv_heads,
        head_dim=hd,
        layer_num=args.layers,
        device="cpu",
        enable_memory_saver=False,
    )
    runner = SimpleNamespace(device="cpu", req_to_token_pool=r2t, token_to_kv_pool=kv, model=model)
    table = get_position_table(r2t, kv)
    g = torch.Generator().manual_seed(args.seed)
    for buf in (*kv.k_buffer, *kv.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))
    slots = (torch.randperm(b * (s + 1), generator=g) + 1).view(b, s + 1)
    layouts = []
    for i in range(b):
        row = i + 1
        r2t.req_to_token[row, : s + 1] = slots[i].int()
        pos = torch.randperm(s, generator=g)
        layouts.append(pos)
        delta = torch.randint(-s, s + 1, (s,), generator=g)
        delta[torch.rand(s, generator=g) >= args.shifted_fraction] = 0
        table.slot_pos[slots[i, :s]] = (pos + delta).int()
    shifted = table.slot_pos.clone()
    unshifted = table.slot_pos.clone()
    for i, pos in enumerate(layouts):
        unshifted[slots[i, :s]] = pos.int()
    return SimpleNamespace(
        args=args,
        dtype=dtype,
        table=table,
        layouts=layouts,
        slots=slots,
        shifted=shifted,
        unshifted=unshifted,
        native=TorchNativeAttnBackend(runner),
        td=TokenDanceAttnBackend(runner),
        layers=[
            RadixAttention(args.heads, hd, hd**-0.5, num_kv_heads=args.kv_heads, layer_id=i)
            for i in range(args.layers)
        ],
    )


def batch(w: SimpleNamespace, decode: bool) -> tuple[Any, torch.Tensor, ...]:
    """(ForwardBatch, q, k, v) of the extend or decode step over the laid-out rows."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    a = w.args
    b, s = a.batch, a.seq
    e = 1 if decode else a.extend
    seq = s + 1 if decode else s
    rows = torch.arange(1, b + 1)
    if decode:
        out_loc, pos = w.slots[:, s], torch.full((b,), s)
    else:
        out_loc = w.slots[:, s - e : s].reshape(-1)
        pos = torch.cat([lay[s - e :] for lay in w.layouts])
    g = torch.Generator().manual_seed(a.seed + 1)
    n = b * e
    q = torch.randn(n, a.heads * a.head_dim, generator=g).to(w.dtype)
    k = torch.randn(n, a.kv_heads, a.head_dim, generator=g).to(w.dtype)
    v = torch.randn(n, a.kv_heads, a.head_dim, generator=g).to(w.dtype)
    seq_lens = torch.full((b,), seq)
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        batch_size=b,
        input_ids=torch.zeros(n, dtype=torch.long),
        req_pool_indices=rows,
        seq_lens=seq_lens,
        out_cache_loc=out_loc,
        seq_lens_sum=b * seq,
        positions=pos,
        seq_lens_cpu=seq_lens,
        extend_seq_lens=torch.full((b,), e),
        extend_prefix_lens=torch.full((b,), seq - e),
        extend_seq_lens_cpu=[e] * b,
        extend_prefix_lens_cpu=[seq - e] * b,
    )
    return fb, q, k, v


def set_layouts(w: SimpleNamespace, on: bool) -> None:
    for i, lay in enumerate(w.layouts):
        if on:
            w.table.set_layout(i + 1, lay)
        else:
            w.table.clear_layout(i + 1)


def run_once(
    w: SimpleNamespace, variant: str, fb: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> float:
    backend = w.native if variant == "native" else w.td
    set_layouts(w, variant in ("tokendance", "td_no_delta"))
    w.table.slot_pos.copy_(w.unshifted if variant == "td_no_delta" else w.shifted)
    t = time.perf_counter()
    backend.init_forward_metadata(fb)
    for layer in w.layers:
        backend.forward(q, k, v, layer, fb)
    return (time.perf_counter() - t) * 1e3


def stats(ts: list[float]) -> dict:
    qs = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return dict(median=statistics.median(ts), p25=qs[0], p75=qs[2], min=min(ts), max=max(ts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--extend", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--theta", type=float, default=100000.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--shifted-fraction",
        type=float,
        default=1.0,
        help="share of prefix keys with a nonzero delta (1.0: the worst case)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); 1 keeps a shared box steady",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/rotation_overhead.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    w = build(args)
    variants = ("native", "tokendance", "td_no_delta", "td_plain")
    doc: dict[str, Any] = dict(
        args={k: str(v) for k, v in vars(args).items()},
        torch_threads=torch.get_num_threads(),
        modes={},
    )
    for mode in ("extend", "decode"):
        fb, q, k, v = batch(w, decode=mode == "decode")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.warmup + args.repeats):
            for name in variants:  # interleaved, so drift hits every variant alike
                t = run_once(w, name, fb, q, k, v)
                if r >= args.warmup:
                    times[name].append(t)
        res = {name: stats(ts) for name, ts in times.items()}
        native = res["native"]["median"]
        res["ratio_tokendance_vs_native"] = res["tokendance"]["median"] / native
        res["ratio_td_plain_vs_native"] = res["td_plain"]["median"] / native
        res["ratio_rotation"] = res["tokendance"]["median"] / res["td_no_delta"]["median"]
        doc["modes"][mode] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    parts = []
    for mode, r in doc["modes"].items():
        parts.append(
            f"{mode}: rotation x{r['ratio_rotation']:.2f} "
            f"({r['tokendance']['median']:.1f} vs {r['td_no_delta']['median']:.1f} ms), "
            f"vs torch_native x{r['ratio_tokendance_vs_native']:.2f} "
            f"({r['native']['median']:.1f} ms), fast path x{r['ratio_td_plain_vs_native']:.2f}"
        )
    print(
        f"CPU torch path, shifted fraction {args.shifted_fraction}: "
        + "; ".join(parts)
        + f" -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
