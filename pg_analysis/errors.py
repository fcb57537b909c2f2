"""One typed error family for the whole toolkit.

The library raises these; every CLI maps a :class:`PGError` to one line on stderr and exit code 2.
Anything else escaping a CLI is a bug in the toolkit, not bad input.
"""


class PGError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class InputError(PGError, ValueError):
    """Bad arguments or bad data handed to the library (shapes, ranges, files)."""


class ModelUnavailable(PGError):
    """A model (or dataset) cannot be loaded here: not cached locally and the hub is unreachable."""


class AssetError(PGError):
    """An offline packaged asset could not be fetched or converted."""
