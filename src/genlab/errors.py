"""User-facing errors: one line that names the problem and the fix.

Every error a user can cause (bad config key, missing data, corrupt image, impossible shape,
NaN loss) is raised as a :class:`GenlabError`; the CLI prints ``error: <message>`` and exits 2
instead of showing a traceback from deep inside.
"""


class GenlabError(Exception):
    """An error caused by the user's input, with a one-line message saying what to do."""


class ConfigError(GenlabError, ValueError):
    """An unknown, ill-typed or inconsistent configuration value."""


class DataError(GenlabError):
    """Missing, unreadable or inconsistent data."""


class TrainingDiverged(GenlabError):
    """A non-finite loss; the last good checkpoint is left intact."""


class WriteError(GenlabError, OSError):
    """A file could not be written (disk full, file too large, read-only folder); earlier files are intact."""
