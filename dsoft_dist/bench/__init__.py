"""Benchmarks: scripts that print ratios measured side by side in one run (not tests).

    python -m dsoft_dist.bench.data    # data pipeline vs a bare JPEG decode loop
    python -m dsoft_dist.bench.head    # one sharded head step vs sample rate
"""


def int_list(text: str, option: str, low: int) -> list[int]:
    """'0,1,2' or '100000,1e6' -> [ints]; ValueError naming the option unless each is a whole number >= low."""
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        numbers = []
    if not numbers or not all(n.is_integer() and n >= low for n in numbers):
        raise ValueError(f"{option} {text!r} is invalid: give comma-separated integers >= {low}, e.g. "
                         f"{low},{low + 1}")
    return [int(n) for n in numbers]

