"""The one base of every error mtpd raises for its users.

Each part keeps its own subclass (``StoreError``, ``PlanError``, ``TeacherError`` ...)
so callers can tell them apart, and each CLI catches ``MtpdError`` alone and prints
its one-line message. Subclasses also derive from the builtin they replaced
(``ValueError`` or ``RuntimeError``), so older ``except ValueError`` code still works.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any


class MtpdError(Exception):
    """An error whose message names the file, key or value at fault and what to do next."""


def message(e: BaseException) -> str:
    """The one-line message of ``e``. An error raised in a DataLoader worker reaches the training
    process wrapped in the worker's traceback; its own message is the traceback's last line."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def unknown_keys(data: Mapping[Any, Any], known: Container[Any]) -> list[str]:
    """The keys of ``data`` (a user's YAML mapping) not in ``known``, sorted and named as one-line text.

    YAML keys need not be strings (``?`` alone is ``{None: None}``, ``1: x`` an int) nor printable (a quoted
    newline): such keys are named by ``repr``, so they sort together and an error naming them stays on one line.
    """
    odd = sorted((k for k in data if k not in known), key=repr)
    return [k if isinstance(k, str) and k.isprintable() and k.strip() == k else repr(k) for k in odd]
