"""SGLang plugin entry point (``sglang.srt.plugins: tokendance``).

``register()`` runs in every SGLang process (launcher, scheduler, detokenizer) before arguments
are parsed. It adds the CLI flags, registers the radix cache backend and the attention backend
named "tokendance", and installs hooks through SGLang's HookRegistry. Every hook is a no-op unless
``--enable-tokendance`` was given; with the flag absent SGLang behaves exactly as without the
plugin. The config travels to the scheduler as an underscore attribute of ServerArgs (it survives
pickling; the sealed msgspec fields do not admit new names).
"""

from __future__ import annotations

import logging
import pkgutil
from typing import Any

from sglang_tokendance import SGLANG_VERSION
from sglang_tokendance.config import TokenDanceConfig, add_cli_args, from_namespace

logger = logging.getLogger("sglang_tokendance")

CONFIG_ATTR = "_tokendance_config"
BACKEND_NAME = "tokendance"

# Every SGLang name the plugin hooks or calls into. Checked by register() so a different
# SGLang fails loudly at startup instead of silently running without TokenDance.
HOOKED_NAMES: tuple[str, ...] = (
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
    "sglang.srt.mem_cache.registry.register_radix_cache_backend",
    "sglang.srt.mem_cache.radix_cache.RadixCache",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request",
    "sglang.srt.managers.scheduler.Scheduler.__init__",
    "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
    "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
    "sglang.srt.managers.scheduler.Scheduler.process_batch_result",
    "sglang.srt.managers.scheduler.Scheduler.abort_request",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state",
    "sglang.srt.entrypoints.http_server.launch_server",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend",
    "sglang.srt.mem_cache.base_prefix_cache.MatchPrefixParams",
)

_registered = False


def check_sglang_names(names: tuple[str, ...] = HOOKED_NAMES) -> None:
    """Raise RuntimeError naming the SGLang version if any hooked name is missing."""
    import sglang

    missing = []
    for name in names:
        try:
            pkgutil.resolve_name(name)
        except (ImportError, AttributeError):
            missing.append(name)
    if missing:
        raise RuntimeError(
            f"sglang-tokendance supports SGLang {SGLANG_VERSION}, but the installed SGLang "
            f"{getattr(sglang, '__version__', '?')} lacks: {', '.join(missing)}. "
            f"Install sglang=={SGLANG_VERSION}."
        )


def get_config(server_args: Any) -> TokenDanceConfig:
    """The TokenDance config attached to ``server_args`` (disabled if none)."""
    cfg = getattr(server_args, CONFIG_ATTR, None)
    if cfg is None:
        return TokenDanceConfig()
    if isinstance(cfg, dict):
        return TokenDanceConfig(**cfg)
    return cfg


def _after_add_cli_args(result: Any, parser: Any) -> Any:
    add_cli_args(parser)
    return result


def _after_from_cli_args(server_args: Any, cls: Any, args: Any) -> Any:
    del cls
    cfg = from_namespace(args)  # ValueError with the flag's name on bad values
    if not cfg.enabled:
        return server_args
    page_size = getattr(server_args, "page_size", None)
    if page_size not in (None, 1):
        raise ValueError(
            f"TokenDance requires --page-size 1 (token-sparse diffs); got --page-size {page_size}"
        )
    server_args.radix_cache_backend = BACKEND_NAME
    # Every mode (off included) runs the same position-aware backend, so a comparison
    # measures the reuse, not a kernel difference. Rows without layouts take torch_native's code.
    if getattr(server_args, "attention_backend", None) in (None, "torch_native"):
        server_args.attention_backend = BACKEND_NAME
    # The collector writes KV layouts from the scheduler between batches: overlap scheduling
    # would run the next batch's prep concurrently with the current forward.
    server_args.disable_overlap_schedule = True
    # A plain dict pickles into the scheduler process without importing this package there first.
    setattr(server_args, CONFIG_ATTR, cfg.to_dict())
    logger.info("TokenDance is on: %s", cfg.describe())
    return server_args


def _make_tree_cache(ctx: Any) -> Any:
    from sglang_tokendance.cache.radix import make_tree_cache

    return make_tree_cache(ctx)


def register() -> None:
    """Register flags, backends and hooks with SGLang (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang_tokendance.openai_compat import HOOK_TARGETS

    check_sglang_names(HOOKED_NAMES + tuple(HOOK_TARGETS))
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args", _after_from_cli_args, HookType.AFTER
    )
    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, _make_tree_cache)
    from sglang_tokendance import entry, forward_hooks, openai_compat, scheduler, stats
    from sglang_tokendance.attention.backend import register_backend

    register_backend()
    entry.install_hooks()
    scheduler.install_hooks()
    forward_hooks.install_hooks()
    stats.install_hooks()
    openai_compat.install_hooks()
    _registered = True
