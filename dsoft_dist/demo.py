"""``dsoft demo``: the embedded default job (filled in below)."""


def register(subparsers) -> None:
    pass
