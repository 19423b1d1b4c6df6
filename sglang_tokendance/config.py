"""TokenDanceConfig: the ``--tokendance-*`` options, parsed, validated and carried to workers."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Literal

Mode = Literal["tokendance", "pic", "off"]
MODES: tuple[str, ...] = ("tokendance", "pic", "off")
SELECTIONS: tuple[str, ...] = ("leading", "deviation", "both")  # see selection.py
MASTER_POLICIES: tuple[str, ...] = ("fresh", "author")
MIRROR_POLICIES: tuple[str, ...] = ("keep", "threshold", "drop")
MIRROR_SCALES: tuple[str, ...] = ("token", "layer")  # threshold's denominator: mirror_deviation
# threshold (the default policy): a recomputed slot is kept when its K or V (some layer) differs
# from the rotated master's by more than eps, relative to the layer's mean master norm (scale
# layer; attention/mirror_deviation.py). Layer 0.6 from the fidelity benchmark on the trained
# model (README, Results, 2026-12-07, thirteenth session): at matched slots kept the layer scale
# costs less decode KL than the per-token one, and layer 0.6 keeps keep's greedy answers with
# the decode KL of token 0.5 (the previous default) within the interval, for 22% fewer slots.
# The scale is the model's: the tiny random-weight model's deviations are smaller.
DEFAULT_MIRROR_EPS = 0.6
DEFAULT_MIRROR_SCALE = "layer"
ATTENTION_PATHS: tuple[str, ...] = ("auto", "triton", "torch")  # see attention/dispatch.py
DECODE_PATHS: tuple[str, ...] = ("shared", "rows")  # torch decode: attention/shared_decode.py
MASTER_STARTS: tuple[str, ...] = ("arrival", "release")  # when a master agent's prefill starts
DEFAULT_SEPARATOR = "<|td|>"


# the choice-valued fields of TokenDanceConfig (the flag is --tokendance-<field with dashes>)
_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "selection": SELECTIONS,
    "master_policy": MASTER_POLICIES,
    "mirror": MIRROR_POLICIES,
    "attention": ATTENTION_PATHS,
    "decode": DECODE_PATHS,
    "master_start": MASTER_STARTS,
    "mirror_scale": MIRROR_SCALES,
}

CONFIG_ATTR = "_tokendance_config"  # the one TokenDance attribute of SGLang's ServerArgs


@dataclass(slots=True, frozen=True)
class TokenDanceConfig:
    """Options of the TokenDance plugin (one per server; pickled to the scheduler)."""

    enabled: bool = False
    mode: str = "tokendance"
    recompute_ratio: float = 0.15
    round_timeout_ms: float = 2000.0
    # Defaults chosen by the fidelity benchmark on the trained model (README, Results).
    selection: str = "both"
    master_policy: str = "author"
    check_layer: int = 1
    separator: str = DEFAULT_SEPARATOR
    uniform_attention: bool = False
    mirror: str = "threshold"
    attention: str = "auto"
    mirror_eps: float = DEFAULT_MIRROR_EPS
    decode: str = "shared"
    master_start: str = "arrival"
    mirror_scale: str = DEFAULT_MIRROR_SCALE

    def __post_init__(self) -> None:
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                flag = "--tokendance-" + field.replace("_", "-")
                raise ValueError(f"{flag} must be one of {choices}, got {value!r}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(
                f"--tokendance-recompute-ratio must be in [0, 1], got {self.recompute_ratio}"
            )
        if self.round_timeout_ms <= 0:
            raise ValueError(
                f"--tokendance-round-timeout-ms must be > 0, got {self.round_timeout_ms}"
            )
        if not self.mirror_eps >= 0.0:  # also refuses NaN
            raise ValueError(f"--tokendance-mirror-eps must be >= 0, got {self.mirror_eps}")
        if self.check_layer < 0:
            raise ValueError(f"--tokendance-check-layer must be >= 0, got {self.check_layer}")
        if not self.separator:
            raise ValueError("--tokendance-separator must be a non-empty string")

    @property
    def active(self) -> bool:
        """True when hints are acted on (enabled and not mode off)."""
        return self.enabled and self.mode != "off"

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if k != "enabled")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 milliseconds, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--enable-tokendance`` and the ``--tokendance-*`` options to SGLang's parser."""
    d = TokenDanceConfig()
    g = parser.add_argument_group("TokenDance (collective KV sharing for multi-agent rounds)")
    g.add_argument(
        "--enable-tokendance",
        action="store_true",
        help="Enable TokenDance: round-aware scheduling, shared-segment KV reuse, diff storage.",
    )
    g.add_argument(
        "--tokendance-mode",
        choices=MODES,
        default=d.mode,
        help="tokendance: collective reuse + diff storage; pic: per-request position-independent "
        "caching baseline (CacheBlend-like); off: stock SGLang prefix caching, hints ignored.",
    )
    g.add_argument(
        "--tokendance-recompute-ratio",
        type=_ratio,
        default=d.recompute_ratio,
        help="Fraction of each reused shared segment's tokens recomputed in every agent's "
        "context (0 = pure reuse, 1 = full recompute). Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-round-timeout-ms",
        type=_positive_ms,
        default=d.round_timeout_ms,
        help="How long a round waits for all its agents before running with those present. "
        "Default %(default)s ms.",
    )
    g.add_argument(
        "--tokendance-selection",
        choices=SELECTIONS,
        default=d.selection,
        help="How the recompute set of each shared segment is chosen, once for every agent of "
        "the round: leading = its first ceil(ratio * L) tokens (EPIC-style); deviation = the "
        "tokens whose check-layer attention output deviates most without their context, "
        "measured when the master is computed (CacheBlend-style); both = half leading, half "
        "by deviation. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-master-policy",
        choices=MASTER_POLICIES,
        default=d.master_policy,
        help="Where a shared segment's master KV comes from: fresh = computed once per round "
        "in the context of the first agent holding it; author = the KV its author produced "
        "while generating it, when the segment contains that agent's output tokens and the KV "
        "is still cached (round-spanning reuse), else fresh. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-check-layer",
        type=int,
        default=d.check_layer,
        help="Layer at which deviation is measured for --tokendance-selection deviation/both "
        "(clamped to the model's last layer). Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-separator",
        default=d.separator,
        help="Separator string that splits plain-text prompts into segments for clients that "
        "cannot send structured hints. Default %(default)r.",
    )
    g.add_argument(
        "--tokendance-mirror",
        choices=MIRROR_POLICIES,
        default=d.mirror,
        help="What an agent keeps of the tokens it recomputed in a reused segment: keep = their "
        "KV (a sparse diff against the master, freed with the request); drop = free them after "
        "the agent's prefill and point its row back at the master's slots (later prompt tokens "
        "already saw the corrected KV; decode reads the master's); threshold = drop only the "
        "tokens whose K/V differs from the master's (rotated to the same position) by at most "
        "--tokendance-mirror-eps in every layer. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-mirror-eps",
        type=_non_negative,
        default=d.mirror_eps,
        help="--tokendance-mirror threshold: keep a recomputed token's slot only if, in some "
        "layer, |X - X_master| / scale > eps for its K or V (norms over all heads; the "
        "master's K rotated to the token's position; scale: --tokendance-mirror-scale). 0 keeps "
        "every slot (= keep), a huge value frees every one (= drop). Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-mirror-scale",
        choices=MIRROR_SCALES,
        default=d.mirror_scale,
        help="--tokendance-mirror threshold: what a K/V difference is relative to: token = the "
        "master's own row of that token; layer = the mean norm of the compared master rows in "
        "that layer (what attention sees: the absolute change). Default %(default)s.",
    )
    _add_attention(g)


def _add_attention(g: Any) -> None:
    g.add_argument(
        "--tokendance-attention",
        choices=ATTENTION_PATHS,
        default=TokenDanceConfig().attention,
        help="Kernels for batches that hold a laid-out (reusing) row: triton = fused Triton "
        "extend/decode kernels (rotation in the key load, one launch per layer; on CPU only "
        "under TRITON_INTERPRET=1, for tests); torch = batched torch gather + rotation + SDPA; "
        "auto = triton on CUDA, torch on CPU. Batches without such a row always run the "
        "--attention-backend SGLang would use. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-decode",
        choices=DECODE_PATHS,
        default=TokenDanceConfig().decode,
        help="Decode of laid-out batches on the torch path: shared = the keys that several "
        "rows hold (masters) are read once for the batch, each row's query rotated back by its "
        "delta instead of every row's keys rotated forward; rows = every row gathers and "
        "rotates its own keys. The same attention up to float rounding; shared falls back to "
        "rows when a batch shares too little. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-master-start",
        choices=MASTER_STARTS,
        default=TokenDanceConfig().master_start,
        help="When a master agent (a request holding shared segments that have no master yet) "
        "starts its full prefill: arrival = as soon as it arrives, while the rest of its round "
        "is still arriving; release = when the barrier releases the whole round (the master "
        "agents of a round then run as one batch). The other agents always wait for the "
        "round. Default %(default)s.",
    )
    g.add_argument(
        "--tokendance-uniform-attention",
        action="store_true",
        help="Run every batch (hinted or not) through the position-aware path, so a benchmark "
        "can compare modes on one code path. Off: batches without a laid-out row run the "
        "user's attention backend.",
    )


def from_namespace(ns: argparse.Namespace) -> TokenDanceConfig:
    """Build the config from parsed CLI args (raises ValueError on bad values)."""
    return TokenDanceConfig(
        enabled=bool(getattr(ns, "enable_tokendance", False)),
        mode=getattr(ns, "tokendance_mode", "tokendance"),
        recompute_ratio=float(getattr(ns, "tokendance_recompute_ratio", 0.15)),
        round_timeout_ms=float(getattr(ns, "tokendance_round_timeout_ms", 2000.0)),
        selection=getattr(ns, "tokendance_selection", TokenDanceConfig.selection),
        master_policy=getattr(ns, "tokendance_master_policy", TokenDanceConfig.master_policy),
        check_layer=int(getattr(ns, "tokendance_check_layer", 1)),
        separator=getattr(ns, "tokendance_separator", DEFAULT_SEPARATOR),
        uniform_attention=bool(getattr(ns, "tokendance_uniform_attention", False)),
        mirror=getattr(ns, "tokendance_mirror", TokenDanceConfig.mirror),
        attention=getattr(ns, "tokendance_attention", "auto"),
        mirror_eps=float(getattr(ns, "tokendance_mirror_eps", DEFAULT_MIRROR_EPS)),
        decode=getattr(ns, "tokendance_decode", TokenDanceConfig.decode),
        master_start=getattr(ns, "tokendance_master_start", TokenDanceConfig.master_start),
        mirror_scale=getattr(ns, "tokendance_mirror_scale", TokenDanceConfig.mirror_scale),
    )


def get_config(server_args: Any) -> TokenDanceConfig:
    """The TokenDance config attached to ``server_args`` (disabled if none).

    The plugin stores it as a plain dict (it pickles into the scheduler process without
    importing this package there first; ServerArgs' sealed fields admit no new names).
    """
    cfg = getattr(server_args, CONFIG_ATTR, None)
    if cfg is None:
        return TokenDanceConfig()
    if isinstance(cfg, dict):
        return TokenDanceConfig(**cfg)
    return cfg
