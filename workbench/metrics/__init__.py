"""Metrics: one module per kind of figure, each a plain function or tracker with its protocol."""
