"""Gradio tabs of the browser workbench; each module exposes build_<tab>() used by app.py."""
