"""Adding jaxmerge's context (which call, layer, option) to an exception without losing it."""

__all__ = ["with_context"]


def with_context(error: BaseException, context: str) -> BaseException:
    """The exception to raise for ``error``, with ``context`` (``"merge: layer 'x'"``) in front.

    An exception of the same type with the message ``"{context}: {error}"`` when that type is
    rebuilt from one string (``ValueError``, ``TypeError``, ...). Otherwise, for exceptions with
    other constructors (Flax's scope errors, JAX's tracer errors, a user's own class), ``error``
    itself with ``context`` added as a note (``BaseException.add_note``), so its type, arguments
    and message survive. Raise the result ``from error``, so that a rebuilt exception keeps the
    original as its cause (a note-carrying original is then its own cause, printed once).
    """
    message = f"{context}: {error}"
    try:
        rebuilt = type(error)(message)
    except Exception:  # noqa: BLE001 - any constructor that does not take one string
        rebuilt = None
    if rebuilt is not None and str(rebuilt) == message:
        return rebuilt
    error.add_note(context)
    return error
