"""Logging, metrics and experiment tracking."""
from dsoft_dist.observability.logging import get_logger

__all__ = ["get_logger"]
