"""Evaluation: estimators, metrics, FLOPs/latency accounting and benchmarks."""
