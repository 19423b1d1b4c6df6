"""TokenDanceConfig parsing and validation (the flags SGLang's parser gets)."""

from __future__ import annotations

import argparse

import pytest

from sglang_tokendance.config import TokenDanceConfig, add_cli_args, from_namespace


def _parse(argv: list[str]) -> TokenDanceConfig:
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return from_namespace(p.parse_args(argv))


def test_defaults_and_flags_parse() -> None:
    assert _parse([]) == TokenDanceConfig()
    d = TokenDanceConfig()
    assert (d.mirror, d.mirror_scale, d.mirror_eps, d.selection, d.master_policy) == (
        "threshold",
        "layer",
        0.6,
        "both",
        "author",
    )
    cfg = _parse(
        [
            "--enable-tokendance",
            "--tokendance-mode",
            "pic",
            "--tokendance-recompute-ratio",
            "0.3",
            "--tokendance-round-timeout-ms",
            "250",
            "--tokendance-uniform-attention",
        ]
    )
    assert (cfg.enabled, cfg.mode, cfg.recompute_ratio, cfg.round_timeout_ms) == (
        True,
        "pic",
        0.3,
        250.0,
    )
    assert cfg.uniform_attention and cfg.active
    assert _parse(["--tokendance-mirror-scale", "layer"]).mirror_scale == "layer"


def test_mode_off_is_enabled_but_not_active() -> None:
    cfg = _parse(["--enable-tokendance", "--tokendance-mode", "off"])
    assert cfg.enabled and not cfg.active


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recompute_ratio": -0.1}, "must be in \\[0, 1\\]"),
        ({"mode": "dense"}, "must be one of"),
        ({"selection": "random"}, "--tokendance-selection must be one of"),
        ({"master_policy": "oracle"}, "--tokendance-master-policy must be one of"),
        ({"mirror_scale": "head"}, "--tokendance-mirror-scale must be one of"),
        ({"master_start": "late"}, "--tokendance-master-start must be one of"),
        ({"separator": ""}, "non-empty"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenDanceConfig(**kwargs)
