"""One typed error family for the whole toolkit.

The library raises these; every CLI maps a :class:`PGError` to one line on stderr and exit code 2.
Anything else escaping a CLI is a bug in the toolkit, not bad input.

Code that must not import this package — the grounded model's files, which travel inside checkpoints and import
only torch and transformers — raises its own plain ``ValueError`` subclass; the package that owns it calls
:func:`adopt` once, and the CLIs treat it as an :class:`InputError`.
"""


class PGError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class InputError(PGError, ValueError):
    """Bad arguments or bad data handed to the library (shapes, ranges, files)."""


class ModelUnavailable(PGError):
    """A model (or dataset) cannot be loaded here: not cached locally and the hub is unreachable."""


class AssetError(PGError):
    """An offline packaged asset could not be fetched or converted."""


_ADOPTED: list[type[ValueError]] = []


def adopt(error: type[ValueError]) -> type[ValueError]:
    """Count ``error`` (a ``ValueError`` subclass defined outside this family) as bad input at the CLI boundary."""
    if not (isinstance(error, type) and issubclass(error, ValueError)):
        raise TypeError(f"only ValueError subclasses can be adopted, not {error!r}")
    if error not in _ADOPTED:
        _ADOPTED.append(error)
    return error


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types a CLI reports as one line and exit code 2: :class:`PGError` and every adopted type."""
    return (PGError, *_ADOPTED)
