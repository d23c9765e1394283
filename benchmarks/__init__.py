"""Benchmarks for peft-sparse (not part of the installed package)."""
