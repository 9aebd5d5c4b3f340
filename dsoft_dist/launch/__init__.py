"""Launch helpers: the pre-flight check (dsoft doctor)."""
