"""Pure-PyTorch oracles used by tests and benchmarks (slow, readable, float64-capable)."""
