"""Benchmarks of mssar: ``python -m benchmarks.module_step``, ``python -m benchmarks.pipeline``."""
