"""The one exception type for mistakes a user can fix (a flag, a file, a config value).

``kinfonce`` commands print a :class:`KinfonceError` as one line and exit with code 2, and
so a disk that cannot be written (full, read-only, no permission: an ``OSError`` naming the
file); every other exception is a bug or an environment failure and keeps its traceback.
"""


class KinfonceError(ValueError):
    """A user error: bad input that names the argument and what is allowed.

    A ``ValueError`` subclass, so library callers that catch ``ValueError`` keep working.
    """


class MissingFileError(KinfonceError, FileNotFoundError):
    """A file or directory the user named (or a run needs) does not exist."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler ending the job, ``kill``): raised in the main thread as
    ``KeyboardInterrupt`` is for SIGINT (:func:`kinfonce.scoped.sigterm_raises`), so that a run
    saves what it can and the command exits 143, never 0."""


class DivergedError(KinfonceError, RuntimeError):
    """Training produced non-finite values; the message names the setting to change."""
