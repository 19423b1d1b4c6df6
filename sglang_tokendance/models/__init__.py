"""The project's models: tiny random-weight Llama/Qwen2 models with an offline tokenizer."""

from __future__ import annotations

from sglang_tokendance.models.builder import ARCHS, SIZES, build, model_dir

__all__ = ["ARCHS", "SIZES", "build", "model_dir"]
