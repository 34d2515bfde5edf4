"""Errors a user can act on. Each message names the problem and the fix on one line."""


class StreamMergeError(Exception):
    """Base class: the CLI prints the message alone and exits non-zero."""

    exit_code = 2


class InputError(StreamMergeError):
    """The model directory, options or calibration text cannot be used as given."""


class UnsupportedArchitectureError(InputError):
    """The checkpoint's family is not in the architecture table."""


class CheckpointError(InputError):
    """The checkpoint files are missing, damaged or disagree with the config."""


class ResumeMismatchError(StreamMergeError):
    """out_dir holds a run with a different signature."""


class InsufficientResourcesError(StreamMergeError):
    """Not enough disk or memory for the run, found before any heavy work."""

    exit_code = 3


class DeviceMemoryError(StreamMergeError):
    """The GPU ran out of memory mid-run; the finished layers are kept."""


class Interrupted(KeyboardInterrupt):
    """The user pressed Ctrl-C; the run stopped at a safe point. The message says what to re-run.

    A KeyboardInterrupt, not a StreamMergeError: a caller's `except Exception` must not swallow Ctrl-C.
    """

    exit_code = 130
