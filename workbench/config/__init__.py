"""Configuration: the preset schema and its protocol defaults (`presets`) and the one policy gate for
shared mode (`policy`: caps, allowed folders, refusals).

Imported by `running`, `views`, `ui` and the CLI; never imports them. The preset validates options
against the method classes and the gate asks the planner, so `methods`, `planning`, `data` and `lmeval`
are imported inside functions.
"""
