"""Transports: one module per engine, all implementing ``base.Transport``."""
from .base import Transport

__all__ = ["Transport"]
