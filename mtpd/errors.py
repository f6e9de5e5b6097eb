"""The one base of every error mtpd raises for its users.

Each part keeps its own subclass (``StoreError``, ``PlanError``, ``TeacherError`` ...)
so callers can tell them apart, and each CLI catches ``MtpdError`` alone and prints
its one-line message. Subclasses also derive from the builtin they replaced
(``ValueError`` or ``RuntimeError``), so older ``except ValueError`` code still works.
"""

from __future__ import annotations


class MtpdError(Exception):
    """An error whose message names the file, key or value at fault and what to do next."""
