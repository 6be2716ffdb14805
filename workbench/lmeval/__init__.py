"""lm-eval-harness integration: a local offline task and a runner for loaded variants."""
