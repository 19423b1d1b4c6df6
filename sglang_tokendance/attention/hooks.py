"""SGLang hooks of the attention side (rows of patches/sglang-0.5.23/touchpoints.toml).

- ``ModelRunner.init_attention_backends`` (after): build the runner's :class:`TaggedAttention`
  beside the backends SGLang built (the user's choice stays in place for stock batches).
- ``ForwardBatch.init_new`` (after, through :func:`begin_forward`): tag the forward's KV writes
  and decide its path.
- ``EagerRunner.load_batch`` (after): the eager runner hands the model a copy of the batch;
  the prepared forward follows it.
- ``RadixAttention.forward`` (around): a tagged forward runs the position-tagged path; every
  other forward runs SGLang's own code untouched. Deviation probes run after either.
- ``DecodeCudaGraphRunner`` / ``PrefillCudaGraphRunner`` / ``CPUGraphRunner.can_run_graph``
  (after): a tagged forward, or one with deviation probes to fill, never replays a graph
  (graphs hold kernels captured on stock batches and skip the hooks), so it runs eagerly.

The forward being run is remembered here (one model runner per scheduler process; speculative
decoding and two-batch overlap, which would bring a second runner or split batches, are refused
with TokenDance on by the plugin).
"""

from __future__ import annotations

from typing import Any

from sglang_tokendance.config import get_config
from sglang_tokendance.state import pool_state

# (forward batch, its TaggedAttention) of the forward being run, or (None, None).
_current: list[Any] = [None, None]


def after_init_backends(result: Any, runner: Any, *args: Any, **kw: Any) -> Any:
    """``ModelRunner.init_attention_backends`` (after): the runner's TaggedAttention."""
    cfg = get_config(runner.server_args)
    if cfg.enabled:
        from sglang_tokendance.attention.tagged import TaggedAttention

        pool_state(runner.req_to_token_pool).attention = TaggedAttention(runner, cfg)
    return result


def begin_forward(forward_batch: Any, runner: Any) -> None:
    """Called from ``ForwardBatch.init_new`` (after): remember and prepare the forward."""
    ta = pool_state(runner.req_to_token_pool).attention
    if ta is None:
        return
    _current[0], _current[1] = forward_batch, ta
    ta.prepare(forward_batch)


def after_load_batch(result: Any, runner: Any, forward_batch: Any, *a: Any, **k: Any) -> Any:
    """``EagerRunner.load_batch`` (after): the model sees a copy of the batch (SGLang's eager
    static buffers); the prepared forward follows it."""
    fb, ta = _current
    if ta is not None and fb is forward_batch and result is not forward_batch:
        ta.adopt(forward_batch, result)
        _current[0] = result
    return result


def _tagged_for(forward_batch: Any) -> Any:
    fb, ta = _current
    return ta if fb is forward_batch else None


def around_radix_attention(
    original: Any,
    layer: Any,
    q: Any,
    k: Any,
    v: Any,
    forward_batch: Any,
    save_kv_cache: bool = True,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``RadixAttention.forward`` (around): the tagged path for tagged forwards only."""
    ta = _tagged_for(forward_batch)
    if ta is None:
        return original(layer, q, k, v, forward_batch, save_kv_cache, *args, **kwargs)
    if ta.handles(layer, forward_batch):
        extra = [name for name, val in kwargs.items() if val is not None]
        if args or extra:
            raise NotImplementedError(
                f"TokenDance's position-tagged attention does not take {extra or 'extra'} "
                f"arguments of {type(layer).__name__}.forward (model not supported)"
            )
        if k is not None:
            k = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
            v = v.view(-1, layer.tp_v_head_num, layer.v_head_dim)
        out = ta.forward(layer, q, k, v, forward_batch, save_kv_cache)
    else:
        out = original(layer, q, k, v, forward_batch, save_kv_cache, *args, **kwargs)
    if ta.wants_probes(layer, forward_batch):
        ta.run_probes(q, out, layer, forward_batch)
    return out


def after_can_run_graph(result: Any, graph_runner: Any, forward_batch: Any, *a: Any) -> Any:
    """``*GraphRunner.can_run_graph`` (after): no graph replay for a tagged forward."""
    if not result:
        return result
    ta = pool_state(graph_runner.model_runner.req_to_token_pool).attention
    if ta is None:
        return result
    return not (ta.prepare(forward_batch) or ta.probing)
