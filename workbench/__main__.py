"""Command line: `python -m workbench run PRESET | list-methods | history | export RUN_ID`."""

from workbench.cli import main

raise SystemExit(main())
