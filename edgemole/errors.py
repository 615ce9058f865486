"""Error types whose message is shown to the user as one line.

Every failure a user can cause (bad flags, config, data files, artifacts, an unreachable broker)
raises a subclass of :class:`EdgemoleError`; the CLI prints ``error: <message>`` and exits non-zero.
"""


class EdgemoleError(Exception):
    """A user-facing failure; ``str(err)`` is a complete one-line explanation."""


class ConfigError(EdgemoleError):
    """Invalid configuration file or command-line value."""


class DataError(EdgemoleError):
    """A data file that cannot be read or does not have the expected columns."""


class ModelError(EdgemoleError):
    """A base model that cannot be loaded or adapted."""


class BrokerError(EdgemoleError):
    """The MQTT broker cannot be reached or started."""


class ProtocolError(EdgemoleError):
    """An MQTT message that does not satisfy the wire protocol; it is rejected, never applied."""


class ArtifactError(EdgemoleError):
    """An exported artifact (program, base weights, manifest) that is missing, corrupt or does not fit the task."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (or its type's name): what a one-line error quotes of a library's
    multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
