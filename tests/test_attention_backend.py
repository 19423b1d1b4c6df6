"""The position-tagged path on real SGLang pools, through the RadixAttention hook: permuted and
shifted rows, stock batches on the user's backend, mixed batches, tagging."""

from __future__ import annotations

import os

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before sglang is imported (CPU rope path)

from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from sglang_tokendance.attention import hooks
from sglang_tokendance.attention.shared_decode import SharedPlan
from sglang_tokendance.attention.tagged import TaggedAttention
from sglang_tokendance.config import TokenDanceConfig
from sglang_tokendance.positions import get_position_table
from sglang_tokendance.state import pool_state

HD, H, HKV, N = 16, 4, 2, 12
TOL = dict(atol=1e-5, rtol=1e-5)


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.rotary_emb = get_rope(HD, HD, 4096, 10000, True, rope_scaling, torch.float32)


class Req(NamedTuple):
    """One request of a batch: its row, lengths, fresh slots and the fresh tokens' positions."""

    row: int
    prefix_len: int
    slots: list[int]
    positions: list[int]


class World:
    """Real SGLang pools + one attention layer + a token sequence with raw q/k/v."""

    def __init__(
        self, model: torch.nn.Module | None = None, path: str = "torch", decode: str = "shared"
    ) -> None:
        self.r2t = ReqToTokenPool(
            size=8, max_context_len=64, device="cpu", enable_memory_saver=False
        )
        self.kv = MHATokenToKVPool(
            size=512,
            page_size=1,
            dtype=torch.float32,
            head_num=HKV,
            head_dim=HD,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
        )
        self.model = model or LlamaForCausalLM()
        runner = SimpleNamespace(
            device="cpu", req_to_token_pool=self.r2t, token_to_kv_pool=self.kv, model=self.model
        )
        cfg = TokenDanceConfig(enabled=True, attention=path, decode=decode)
        self.runner = runner
        self.tagged = pool_state(self.r2t).attention = TaggedAttention(runner, cfg)
        self.native = TorchNativeAttnBackend(runner)
        self.table = get_position_table(self.r2t)
        self.layer = RadixAttention(H, HD, HD**-0.5, num_kv_heads=HKV, layer_id=0)
        g = torch.Generator().manual_seed(7)
        # Raw (pre-RoPE) q/k/v of token ids 0..63; token t of the "true prompt" is id t.
        self.q_raw = torch.randn(64, H * HD, generator=g)
        self.k_raw = torch.randn(64, HKV * HD, generator=g)
        self.v = torch.randn(64, HKV, HD, generator=g)

    def qkv(self, ids: list[int], pos: list[int]) -> tuple[torch.Tensor, ...]:
        """q/k rotated by SGLang's RoPE at ``pos`` for tokens ``ids``; v unrotated."""
        i, p = torch.tensor(ids), torch.tensor(pos)
        q, k = self.model.rotary_emb.forward_native(p, self.q_raw[i].clone(), self.k_raw[i].clone())
        return q, k.view(-1, HKV, HD), self.v[i]

    def row(self, row: int, slots: list[int]) -> None:
        self.r2t.req_to_token[row, : len(slots)] = torch.tensor(slots, dtype=torch.int32)

    def forward(
        self, mode: ForwardMode, reqs: list[Req], ids: list[int], backend: object | None = None
    ) -> torch.Tensor:
        """Run one forward of the attention layer; ``ids`` are the fresh tokens, in order."""
        ext = [len(r.slots) for r in reqs]
        seq = [r.prefix_len + e for r, e in zip(reqs, ext, strict=True)]
        pos = [p for r in reqs for p in r.positions]
        fb = ForwardBatch(
            forward_mode=mode,
            batch_size=len(reqs),
            input_ids=torch.zeros(sum(ext)).long(),
            req_pool_indices=torch.tensor([r.row for r in reqs]),
            seq_lens=torch.tensor(seq),
            out_cache_loc=torch.tensor([s for r in reqs for s in r.slots]),
            seq_lens_sum=sum(seq),
            positions=torch.tensor(pos),
            seq_lens_cpu=torch.tensor(seq),
            extend_seq_lens=torch.tensor(ext),
            extend_prefix_lens=torch.tensor([r.prefix_len for r in reqs]),
            extend_seq_lens_cpu=ext,
            extend_prefix_lens_cpu=[r.prefix_len for r in reqs],
        )
        q, k, v = self.qkv(ids, pos)
        self.native.init_forward_metadata(fb)
        if backend is not None:  # SGLang's own backend alone (the reference)
            return self.native.forward(q, k, v, self.layer, fb).view(-1, H, HD)
        hooks.begin_forward(fb, self.runner)  # what ForwardBatch.init_new's hook does
        self.last_tagged = self.tagged.active

        def stock(layer, q, k, v, fb, save_kv_cache=True):  # noqa: ANN001, ANN202
            # RadixAttention.forward's own steps: view k/v per head, call the backend.
            k = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
            return self.native.forward(q, k, v, layer, fb, save_kv_cache)

        out = hooks.around_radix_attention(stock, self.layer, q, k.reshape(len(ids), -1), v, fb)
        return out.view(-1, H, HD)


def _ordinary_prefill(w: World, row: int = 1) -> tuple[list[int], torch.Tensor]:
    """Row ``row`` holds tokens 0..N-1 at slots 1..N; returns (slots, outputs)."""
    slots = list(range(1, N + 1))
    w.row(row, slots)
    out = w.forward(ForwardMode.EXTEND, [Req(row, 0, slots, list(range(N)))], list(range(N)))
    return slots, out


def test_write_records_slot_positions() -> None:
    w = World()
    slots, _ = _ordinary_prefill(w)
    assert w.table.slot_pos[slots].tolist() == list(range(N))


def test_permuted_row_matches_ordinary_row() -> None:
    """A row holding the same slots scrambled (req_to_pos = true positions) attends like the
    ordinary row, in extend (prefix scrambled, fresh tokens scrambled) and in decode."""
    w = World()
    sa, out_a = _ordinary_prefill(w)
    perm = [4, 0, 7, 2, 8, 1, 6, 3, 5]  # tokens reused from row 1, in this row order
    fresh = [10, 9, 11]  # fresh tokens, out of order too
    fresh_slots = [50, 51, 52]
    w.row(2, [sa[t] for t in perm] + fresh_slots)
    w.table.set_layout(2, torch.tensor(perm + fresh))
    out_b = w.forward(ForwardMode.EXTEND, [Req(2, len(perm), fresh_slots, fresh)], fresh)
    torch.testing.assert_close(out_b, out_a[fresh], **TOL)
    # Decode token 12 at position 12 on both rows, in one batch (plain row + laid-out row).
    w.row(1, sa + [13])
    w.row(2, [sa[t] for t in perm] + fresh_slots + [53])
    out = w.forward(ForwardMode.DECODE, [Req(1, N, [13], [N]), Req(2, N, [53], [N])], [N, N])
    torch.testing.assert_close(out[1], out[0], **TOL)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ],
)
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_shifted_master_slots_match_fresh_prefill(scaling: dict | None, path: str) -> None:
    """Slots written by another row at other positions (a master) and reused at the true
    positions through the delta give the attention output of a fresh prefill, on the torch
    path and on the Triton path (interpreter)."""
    w = World(LlamaForCausalLM(scaling), path=path)
    sa, out_a = _ordinary_prefill(w)
    # Row 3 (the master's author): 20 junk tokens (ids 40..59), then tokens 2..6 at 20..24.
    author_ids = list(range(40, 60)) + [2, 3, 4, 5, 6]
    sc = list(range(100, 125))
    w.row(3, sc)
    w.forward(ForwardMode.EXTEND, [Req(3, 0, sc, list(range(25)))], author_ids)
    master = {t: sc[20 + t - 2] for t in range(2, 7)}  # token -> slot written at t + 18
    # Row 4: private prefix (own slots for tokens 0,1), master slots scrambled, fresh tokens.
    private = [200, 201]
    w.row(4, private)
    w.forward(ForwardMode.EXTEND, [Req(4, 0, private, [0, 1])], [0, 1])
    order = [5, 2, 6, 3, 4]
    fresh, fresh_slots = [9, 7, 11, 8, 10], [210, 211, 212, 213, 214]
    w.row(4, private + [master[t] for t in order] + fresh_slots)
    w.table.set_layout(4, torch.tensor([0, 1] + order + fresh))
    out_b = w.forward(ForwardMode.EXTEND, [Req(4, 7, fresh_slots, fresh)], fresh)
    torch.testing.assert_close(out_b, out_a[fresh], atol=1e-4, rtol=1e-4)
    assert (w.table.slot_pos[[master[t] for t in order]] != torch.tensor(order)).all()


def test_no_layout_batch_runs_the_users_backend_bit_identical() -> None:
    w = World()
    sa, _ = _ordinary_prefill(w)
    w.row(5, sa[:8] + [60, 61, 62, 63])  # a prefix hit on row 1's first 8 slots
    reqs = [Req(5, 8, [60, 61, 62, 63], [8, 9, 10, 11])]
    mine = w.forward(ForwardMode.EXTEND, reqs, [8, 9, 10, 11])
    assert not w.last_tagged
    ref = w.forward(ForwardMode.EXTEND, reqs, [8, 9, 10, 11], backend=w.native)
    assert torch.equal(mine, ref)
    w.row(5, sa[:8] + [60, 61, 62, 63, 64])
    dec = [Req(5, 12, [64], [12])]
    assert torch.equal(
        w.forward(ForwardMode.DECODE, dec, [12]),
        w.forward(ForwardMode.DECODE, dec, [12], backend=w.native),
    )
    assert w.table.slot_pos[[60, 61, 62, 63, 64]].tolist() == [8, 9, 10, 11, 12]


def test_mixed_batch_takes_the_tagged_path_and_plain_rows_stay_correct() -> None:
    """A batch holding a laid-out row runs wholly on the tagged path; its plain row reads
    identity positions: the stock result up to float rounding."""
    w = World()
    sa, _ = _ordinary_prefill(w)
    w.row(2, [sa[t] for t in [3, 1, 0, 2]] + [30, 31])
    w.table.set_layout(2, torch.tensor([3, 1, 0, 2, 4, 5]))
    w.row(5, sa[:8] + [60, 61])
    plain = Req(5, 8, [60, 61], [8, 9])
    mixed = w.forward(ForwardMode.EXTEND, [Req(2, 4, [30, 31], [4, 5]), plain], [4, 5, 8, 9])
    assert w.last_tagged
    alone = w.forward(ForwardMode.EXTEND, [plain], [8, 9], backend=w.native)
    torch.testing.assert_close(mixed[2:], alone, **TOL)
    assert w.table.slot_pos[[30, 31, 60, 61]].tolist() == [4, 5, 8, 9]


@pytest.mark.parametrize("decode", ["rows", "shared"])
def test_decode_plan_is_extended_across_steps_and_rebuilt_when_rows_change(decode: str) -> None:
    """Three decode steps of a laid-out row next to a plain one holding the same slots: each
    equals the ordinary row's output; steps 2-3 extend the kept plan, a repointed row forces a
    rebuild. Shared decode reads the two rows' common keys once (its private keys grow)."""
    w = World(decode=decode)
    sa, _ = _ordinary_prefill(w)
    perm = [4, 0, 7, 2, 8, 1, 6, 3, 5, 9, 10, 11]
    w.row(2, [sa[t] for t in perm])
    w.table.set_layout(2, torch.tensor(perm))
    plans = []
    for step in range(3):
        t, s1, s2 = N + step, 13 + step, 53 + step
        w.row(1, w.r2t.req_to_token[1, : N + step].tolist() + [s1])
        w.row(2, w.r2t.req_to_token[2, : N + step].tolist() + [s2])
        if step == 2:
            w.table.row_changed(2)  # e.g. a mirror repointed at its master
        out = w.forward(ForwardMode.DECODE, [Req(1, t, [s1], [t]), Req(2, t, [s2], [t])], [t, t])
        assert w.last_tagged
        torch.testing.assert_close(out[1], out[0], **TOL)
        plans.append(w.tagged._decode)
    keys = [p.private if decode == "shared" else p for p in plans]
    assert all(isinstance(p, SharedPlan) == (decode == "shared") for p in plans)
    assert keys[1].slots is keys[0].slots  # extended in place
    assert keys[2].slots is not keys[1].slots  # rebuilt after the row changed
    assert plans[2].seq_lens == [N + 3, N + 3]


def test_triton_path_matches_torch_path_on_real_pools() -> None:
    """The same laid-out extend + decode through --tokendance-attention triton (interpreter)."""
    outs = []
    for path in ("torch", "triton"):
        w = World(path=path)
        sa, _ = _ordinary_prefill(w)
        perm = [4, 0, 7, 2, 8, 1, 6, 3, 5]
        w.row(2, [sa[t] for t in perm] + [50, 51, 52])
        w.table.set_layout(2, torch.tensor(perm + [10, 9, 11]))
        ext = w.forward(ForwardMode.EXTEND, [Req(2, 9, [50, 51, 52], [10, 9, 11])], [10, 9, 11])
        w.row(2, [sa[t] for t in perm] + [50, 51, 52, 53])
        dec = w.forward(ForwardMode.DECODE, [Req(2, N, [53], [N])], [N])
        outs.append((ext, dec))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)


def test_unsupported_model_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        World(LlamaForCausalLM({"rope_type": "default", "mrope_section": [2, 3, 3]}))


def test_dispatch_on_a_cuda_device_picks_triton_for_laid_out_and_the_backend_for_stock() -> None:
    """The device is faked where the decision is made: auto is triton on CUDA, torch on CPU;
    a batch is tagged only when it holds a laid-out row (or uniform is asked for)."""
    from sglang_tokendance.attention.dispatch import batch_is_tagged, resolve_path

    assert resolve_path("auto", "cuda:0", env={}) == "triton"
    assert resolve_path("auto", "cpu", env={}) == "torch"
    assert resolve_path("torch", "cuda", env={}) == "torch"
    assert resolve_path("triton", "cpu", env={"TRITON_INTERPRET": "1"}) == "triton"
    with pytest.raises(ValueError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        resolve_path("triton", "cpu", env={})
    assert not batch_is_tagged([1, 2], set(), uniform=False)
    assert not batch_is_tagged([1, 2], {3}, uniform=False)
    assert batch_is_tagged([1, 2], {2}, uniform=False)
    assert batch_is_tagged([1], set(), uniform=True)
