"""The project's own error types: what a user did wrong (data, config, artifacts), never a bug.

The CLI prints a :class:`SemConvError` as one message (file, field and fix) instead of a traceback; set
``SEMCONV_DEBUG=1`` or pass ``--debug`` to see the traceback as well. Every class also derives from
``ValueError`` so callers that caught ``ValueError`` keep working.
"""

from __future__ import annotations


class SemConvError(ValueError):
    """Base of every error caused by the user's input: the message names the file or field and the fix."""


class ConfigError(SemConvError):
    """A configuration value is out of range or inconsistent (names the field and the allowed values)."""


class ArtifactError(SemConvError):
    """A stage artifact is missing, incomplete, edited by hand or written for other inputs."""


def require(condition: bool, field: str, allowed: str, value: object) -> None:
    """Refuse a configuration value at construction: raise :class:`ConfigError` unless ``condition`` holds.

    Args:
        condition: whether the value is acceptable.
        field: the setting as the user writes it, e.g. ``data.init_args.batch_size``.
        allowed: what the setting must be, completing "must be ...", e.g. ``"> 0"`` or ``"in [0, 1)"``.
        value: the value given (shown in the message).

    Raises:
        ConfigError: "``field`` must be ``allowed``, got ``value``" with the fix.
    """
    if not condition:
        raise ConfigError(f"{field} must be {allowed}, got {value!r}. Change it in the config or on the command line.")
