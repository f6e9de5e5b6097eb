"""The one base of every error mtpd raises for its users.

Each part keeps its own subclass (``StoreError``, ``PlanError``, ``TeacherError`` ...)
so callers can tell them apart, and each CLI catches ``MtpdError`` alone and prints
its one-line message. Subclasses also derive from the builtin they replaced
(``ValueError`` or ``RuntimeError``), so older ``except ValueError`` code still works.
"""

from __future__ import annotations


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
