"""SGLang plugin entry point (``sglang.srt.plugins: tokendance``).

``register()`` runs in every SGLang process (launcher, scheduler, detokenizer) before arguments
are parsed. It adds the CLI flags, registers the radix cache backend named "tokendance", and
installs hooks through SGLang's HookRegistry (the attention side hooks SGLang's attention layer,
not its backend registry: the user's backend keeps running stock batches). Every hook is a
no-op unless ``--enable-tokendance`` was given; with the flag absent SGLang behaves exactly as
without the plugin. The config travels to the scheduler as an underscore attribute of ServerArgs
(it survives pickling; the sealed msgspec fields do not admit new names).
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_tokendance import patches
from sglang_tokendance.attention.dispatch import resolve_path
from sglang_tokendance.config import CONFIG_ATTR, add_cli_args, from_namespace

logger = logging.getLogger("sglang_tokendance")

BACKEND_NAME = "tokendance"

_registered = False


def after_add_cli_args(result: Any, parser: Any) -> Any:
    """``ServerArgs.add_cli_args`` (after): the TokenDance flags."""
    add_cli_args(parser)
    return result


def after_from_cli_args(server_args: Any, cls: Any, args: Any) -> Any:
    """``ServerArgs.from_cli_args`` (after): validate, select the radix cache, attach the
    config."""
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
    # The attention backend stays the user's (or SGLang's default for the device): batches
    # without a laid-out row run it untouched; the position-tagged path is chosen per batch
    # (attention/dispatch.py). Refuse a path this device cannot run now, not at first forward.
    device = getattr(server_args, "device", None)
    if device is not None:
        resolve_path(cfg.attention, str(device))
    for flag, attr in (
        ("--speculative-algorithm", "speculative_algorithm"),
        ("--enable-two-batch-overlap", "enable_two_batch_overlap"),
    ):
        if getattr(server_args, attr, None):
            raise ValueError(
                f"TokenDance does not support {flag} (a second model runner or "
                "split batches would bypass its attention path)"
            )
    # The collector writes KV layouts from the scheduler between batches: overlap scheduling
    # would run the next batch's prep concurrently with the current forward.
    server_args.disable_overlap_schedule = True
    # A plain dict pickles into the scheduler process without importing this package there first.
    setattr(server_args, CONFIG_ATTR, cfg.to_dict())
    logger.info("TokenDance is on: %s", cfg.describe())
    return server_args


def make_tree_cache(ctx: Any) -> Any:
    """The radix cache backend "tokendance"; the probe board is handed in (the cache never
    imports the attention package)."""
    from sglang_tokendance.attention.deviation import get_probe_board
    from sglang_tokendance.cache.radix import make_tree_cache as build

    pool = ctx.params.req_to_token_pool
    listeners = [get_probe_board(pool).pop] if pool is not None else []
    return build(ctx, row_listeners=listeners)  # unread probes of a released row die


def register() -> None:
    """Check the touch-point table against SGLang, register the backends, install the hooks
    (idempotent)."""
    global _registered
    if _registered:
        return
    table = patches.load_table()
    patches.check_names(table)
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, make_tree_cache)
    patches.install_hooks(table)
    _registered = True
