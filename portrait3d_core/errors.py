"""Exceptions with messages that name the problem and the fix."""


class Portrait3DError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointError(Portrait3DError):
    """A model or tri-grid file is missing, truncated, of the wrong kind, or refused as unsafe."""


class InvalidInputError(Portrait3DError, ValueError):
    """An argument has the wrong shape, range or type."""
