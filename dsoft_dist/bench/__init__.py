"""Benchmarks: scripts that print ratios measured side by side in one run (not tests).

    python -m dsoft_dist.bench.data    # data pipeline vs a bare JPEG decode loop
    python -m dsoft_dist.bench.head    # one sharded head step vs sample rate
"""
