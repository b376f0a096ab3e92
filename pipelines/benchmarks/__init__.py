"""Benchmarks, run by hand: each prints ratios measured side by side in one run (docs/benchmarks.md)."""
