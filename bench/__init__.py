"""Benchmarks against the physical ceilings: `bench/run` (or `python bench/suite.py`) runs them all."""
