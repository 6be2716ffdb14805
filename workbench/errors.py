"""User-facing errors: a message a person can act on, shown by the CLI and the UI without a stack trace."""


class WorkbenchError(Exception):
    """Bad input or an unusable environment, described in one actionable sentence."""


class PresetError(WorkbenchError):
    """The preset (or command-line arguments) cannot be run as written."""


class SourceError(WorkbenchError):
    """The model source cannot be resolved or is not a causal language model."""


class EvalTextError(WorkbenchError):
    """The evaluation or calibration text cannot provide what the protocol asks for."""
