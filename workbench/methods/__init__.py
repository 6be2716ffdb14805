"""Compression methods, one module per family, registered lazily in `registry.py`."""
