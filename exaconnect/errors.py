"""Exceptions that the CLI turns into one clear line and a non-zero exit."""


class ExaconnectError(Exception):
    """Base class: the message names the offending file, layer or parameter and what was expected."""


class InputError(ExaconnectError):
    """A source file, option or box that cannot be used as given."""


class LayerError(ExaconnectError):
    """A precomputed layer that is missing, malformed or incompatible with the request."""


class QueueError(ExaconnectError):
    """A task queue that cannot be opened or used."""
