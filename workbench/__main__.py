"""Command line: `python -m workbench COMMAND`; `python -m workbench --help` lists the commands (workbench/cli.py)."""

from workbench.cli import main

raise SystemExit(main())
