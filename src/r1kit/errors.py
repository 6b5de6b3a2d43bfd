"""User-facing errors.

``R1kitError`` is raised for bad input a user can fix (a missing file, an unknown task, a gold answer
that does not parse, an inconsistent config). The CLI prints its message as one line and exits with
status 2; a traceback is shown only with ``--debug``. Anything else is a bug and keeps its traceback.
"""


class R1kitError(Exception):
    """Bad input or environment; the message names the field/file/row and the fix."""


class ConfigError(R1kitError):
    """A configuration value is invalid; the message names the field."""


class DataError(R1kitError):
    """A dataset row or file is invalid; the message names the file and row."""


class TrainingStopped(R1kitError):
    """Training stopped by a guard (non-finite loss or grad norm); the last good checkpoint is kept."""
