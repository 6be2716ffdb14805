"""Running: the runner that orders a preset's steps, the worker entry points each step runs in a fresh
process, the typed hand-offs between them, the interleaved speed pass, Ray scale-out and sweeps.

Everything below (config, data, analysis, methods, planning, runtimes, metrics, lmeval) may be imported
from here; nothing here imports `views` or `ui` at module level (the runner loads `views.report` only to
write the finished run's HTML).
"""
