"""Benchmarks: t5jax next to its references, measured in one run (see docs/benchmarks.md).

A package run from the repository root, one script per measurement: `python -m benchmarks.train`,
`python -m benchmarks.decode`, ... Shared plumbing (fresh worker processes, load, machine state)
is `benchmarks._harness`; the model-FLOP formula the throughput tables use is `benchmarks.flops`.
"""
