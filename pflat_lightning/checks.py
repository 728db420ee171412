"""Argument checks shared by constructors and commands: a bad value raises a sentence naming the argument,
the value and what is allowed."""
from __future__ import annotations

from typing import Optional, Sequence


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Refuse a ``value`` of argument ``name`` outside ``allowed``.

    Raises:
        ValueError: naming ``name``, ``value`` and the allowed values.
    """
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")


def check_count(name: str, value: int, minimum: int) -> None:
    """Refuse a count ``value`` of argument ``name`` below ``minimum``.

    Raises:
        ValueError: naming ``name``, ``value`` and ``minimum``.
    """
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")


def check_optional_count(name: str, value: Optional[int], minimum: int) -> None:
    """Refuse a count ``value`` of argument ``name`` below ``minimum``; ``None`` (no limit) is allowed.

    Raises:
        ValueError: naming ``name``, ``value`` and ``minimum``.
    """
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be None (all) or an integer >= {minimum}, got {value}.")


def check_fraction(name: str, value: float) -> None:
    """Refuse a fraction ``value`` of argument ``name`` outside ``[0, 1)``.

    Raises:
        ValueError: naming ``name`` and ``value``.
    """
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}.")
