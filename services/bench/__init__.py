"""Benchmarks of the event store against plain redis-py baselines."""
