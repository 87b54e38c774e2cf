"""Errors a user can cause and fix. The CLI prints each as one ``error:`` line."""


class StreamdetError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(StreamdetError):
    """The configuration file or its overrides are invalid."""


class WeightsError(StreamdetError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class SourceError(StreamdetError):
    """A video source cannot be opened or read."""
