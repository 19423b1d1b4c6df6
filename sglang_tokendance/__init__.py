"""sglang-tokendance: collective KV sharing for multi-agent LLM serving on SGLang."""

from __future__ import annotations

__version__ = "0.1.0"
SGLANG_VERSION = "0.5.23"
