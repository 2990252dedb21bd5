"""pyssl microbenchmark suite: `python -m bench` (see bench/harness.py)."""
