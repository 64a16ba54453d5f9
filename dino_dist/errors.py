"""Every error that means "the user asked for something that cannot be done".

Each carries one line naming the problem and the fix; the commands print it and exit non-zero
instead of showing a traceback. Anything else that escapes is a bug.
"""


class ConfigError(ValueError):
    """A user mistake in the config; the message is one line naming the key and the fix."""


class DataError(ValueError):
    """A problem with the data the user pointed us at; the message says how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (or written); the message names the file."""


class RunDirectoryBusy(RuntimeError):
    """Another live run owns train.output_dir; the message names it and what to do."""


class NonFiniteLossError(RuntimeError):
    """Raised on every rank at once after too many consecutive non-finite steps."""


class SubmitError(Exception):
    """A user mistake in a SLURM submission; one line naming the problem and the fix."""


class PlotError(RuntimeError):
    """A one-line problem with the run directory or the environment of dino-plot."""


def one_line(err: Exception) -> str:
    """A user error's message. One raised in a DataLoader worker process arrives wrapped in
    that worker's traceback (torch re-raises it with the traceback as its text), whose last
    line holds the message."""
    text = str(err).rstrip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(name):] if last.startswith(name) else last


# What a command reports in one line (exit code 2 before any work, 1 after it started).
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirectoryBusy, NonFiniteLossError,
               SubmitError, PlotError)
