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
