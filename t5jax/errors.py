"""The errors t5jax reports to a user as one line: bad configuration, data, checkpoints, runs.

Each is raised where the problem is found, with a message that says what is wrong and what to do;
the CLIs (`train.py`, `decode.py`) print it as one line and exit non-zero. Any other exception is
a bug and keeps its traceback. A module of its own, importing nothing, so that every layer can
raise them without importing the layers above.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration value that cannot work (found when the typed config is built)."""


class DataError(ValueError):
  """A malformed or empty data file; the message starts with `file:line:` where it applies."""


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be loaded as the stated architecture."""


class TrainingError(RuntimeError):
  """A run that cannot start or continue; the message says why and what is kept."""


# What the CLIs print as one line (a missing file is the user's too).
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError)
