"""Importing the user's own ``package.module:factory`` callables, for teachers and students alike.

A leaf module (the trainer may not import ``mtpd.teachers``, so the import logic both share
lives here): it resolves the string, never calls the factory, and says what to do when the
module or attribute is missing.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

from mtpd.errors import MtpdError


class FactoryError(MtpdError, ValueError):
    """A ``package.module:factory`` that cannot be imported, called, or whose result mtpd cannot use."""


def is_factory_spec(name: str) -> bool:
    """``package.module:factory`` rather than a registered name (registered names hold no colon)."""
    return ":" in name


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``: an exception as one line, for error messages that quote it."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def cwd_on_path() -> None:
    """Put the current directory at the front of ``sys.path`` unless it is there already.

    ``python -m`` makes the current directory importable; console scripts (``mtpd-train``)
    do not, so a factory in ``./my_detectors.py`` would be found by one and not the other.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_factory(spec: str, role: str = "student") -> Callable[..., Any]:
    """The callable named ``package.module:factory`` (``factory`` may be dotted: ``module:Class.build``).

    The current working directory is importable, as under ``python -m`` (``cwd_on_path``):
    a factory module beside the plan works when mtpd runs from that folder. FactoryError,
    one line naming ``role`` and ``spec`` and the fix, when the module or attribute is missing
    or the module fails on import.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"{role} {spec!r}: expected package.module:factory, e.g. my_detectors:small_retinanet")
    cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(
            f"{role} {spec!r}: cannot import module {module_name!r} ({first_line(e)}); run from the folder that "
            "holds it, install it, or add its folder to PYTHONPATH"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import, the fix is in the module
        raise FactoryError(
            f"{role} {spec!r}: importing {module_name!r} raised {first_line(e)}; fix the module"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = _callables(module)
            raise FactoryError(
                f"{role} {spec!r}: module {module_name!r} has no {attr!r}; callables there: "
                f"{', '.join(public[:20]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{role} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def _callables(module: Any) -> list[str]:
    """The public callables a module defines (those it only imports when it defines none), sorted."""
    found = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
    own = [n for n in found if getattr(getattr(module, n), "__module__", None) == module.__name__]
    return sorted(own or found)


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes keyword ``name`` (or any keyword, through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
