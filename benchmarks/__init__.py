"""TokenDance benchmarks (storage, prefill, capacity, fidelity, report); see benchmarks/README.md.

Each script runs on its own (``python benchmarks/storage.py ...`` or
``python -m benchmarks.storage ...``); ``benchmarks/report.py`` runs a set of them and writes
``benchmarks/results/<date>-<machine>/``.
"""
