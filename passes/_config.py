"""Config field checks shared by the passes' configs (``S2FTConfig``, ``PruneConfig``, ``NMConfig``/``BlockConfig``).

Each check raises :class:`~sparsify_fx.errors.ConfigError` naming the field as the caller spells it (``owner`` is
the prefix: ``"S2FTConfig."``, ``"PruneConfig."`` or ``"sparsify: "``), the value, and what it must be, so every
config reports a bad value the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sparsify_fx.errors import ConfigError


def is_int(x: Any) -> bool:
    """An int that is not a bool (``True`` is an ``int`` to Python, never a count or an index to a config).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """An int or a float that is not a bool.

    Example:
        >>> is_real(0.5), is_real(2), is_real(False)
        (True, True, False)
    """
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_bool(owner: str, name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (not 0/1, not a string).

    Args:
        owner: prefix of the field's name in the message, e.g. ``"S2FTConfig."``.
        name: the field.
        value: its value.

    Example:
        >>> check_bool("S2FTConfig.", "progress", True)
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}{name} must be True or False, got {value!r}.")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices``.

    Args:
        owner: prefix of the field's name in the message.
        name: the field.
        value: its value.
        choices: the accepted strings, in the order the message lists them.

    Example:
        >>> check_choice("PruneConfig.", "scope", "global", ("per_layer", "global"))
    """
    if not isinstance(value, str) or value not in choices:
        listed = repr(choices[-1])
        if len(choices) > 1:
            listed = ", ".join(repr(c) for c in choices[:-1]) + " or " + listed
        raise ConfigError(f"{owner}{name} must be {listed}, got {value!r}.")


def check_seed(owner: str, value: Any) -> None:
    """The ``seed`` field must be an int.

    Example:
        >>> check_seed("S2FTConfig.", 0)
    """
    if not is_int(value):
        raise ConfigError(f"{owner}seed must be an int, got {value!r}; e.g. seed=0.")


def check_calibration(owner: str, value: Any, what: str = "batches (a list or a DataLoader)") -> None:
    """The ``calibration`` field must be None or an iterable of ``what`` (a string is iterable, but never batches).

    Args:
        owner: prefix of the field's name in the message.
        value: the field's value.
        what: what its items are, for the message.

    Example:
        >>> check_calibration("PruneConfig.", [{"input_ids": ids}])
    """
    if value is not None and (isinstance(value, str | bytes) or not isinstance(value, Iterable)):
        raise ConfigError(f"{owner}calibration must be an iterable of {what} or None, got {type(value).__name__}.")


def check_loss_fn(owner: str, value: Any) -> None:
    """The ``loss_fn`` field must be None or a callable ``(model, batch) -> loss``.

    Example:
        >>> check_loss_fn("S2FTConfig.", lambda model, batch: model(**batch).loss)
    """
    if value is not None and not callable(value):
        raise ConfigError(f"{owner}loss_fn must be a callable (model, batch) -> loss or None, got {value!r}.")
