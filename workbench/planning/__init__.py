"""Planning: estimates made before anything loads, for `python -m workbench plan`, the runner's `estimate`
field and the policy gate's time cap.

`modelshape` reads a model's shape from config.json or GGUF metadata (never the weights), `gguf_plan`
predicts llama.cpp's tensor-type mix, `weightsize` and `planner` turn each variant's stages into
weight bytes, peak memory and time by asking the method classes (they hold no method names), and
`machine` calibrates this machine's bandwidth and matmul speed, and `roofline` bounds decode speed by
the bytes each token reads. Nothing here loads a model or imports the
runner or the UI (the torch runtime only resolves a preset's device); the methods are asked for their
own estimates.
"""
