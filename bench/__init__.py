"""Benchmarks: proxy overhead vs direct and vs peers, event emission cost, metering, quota lag (`python -m bench.run`)."""
