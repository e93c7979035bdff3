"""The fast path: every use of another library's private names, in one package, fenced.

Our speed-ups reach into four libraries' internals. Each piece is a module here that lists what
it relies on (``NEEDS``): the private names it uses, and the stand-ins it puts in a library's
place (``STAND_INS``). ``on(piece)`` checks them once per process, at first use (start-up):

* a name is there if the class has it, or if the library's own code uses it (its functions'
  ``co_names``: what ``self.x = ...`` compiles to), so an instance attribute counts too;
* a stand-in fits if it has every public method of the type it replaces that the library's
  class calls (e.g. our ``Inbox`` for uvicorn's ``asyncio.Queue``).

A piece whose check fails is off, with one warning naming the library, its version and what is
missing, and the stock public path is used. Should a piece fail anyway, it takes the stock path
for that call and turns itself off (``turn_off``): never an error on the hot path.
``FAST_PATH=off`` turns every piece off.
``/metrics`` shows which are on (``progress_fast_path``) and how many deliveries took the direct
path (``progress_events_delivered_direct``).

| piece | library | what it saves |
| --- | --- | --- |
| ``protocols`` | uvicorn | leaner per-connection objects: a fifth of an idle connection's memory |
| ``direct`` | uvicorn, websockets | an event's bytes written straight to an idle client's socket; a slow client cut off without a timer per write |
| ``redispy`` | redis-py, asyncio | hiredis command packing, a cheaper ready check per command |
| ``sse`` | sse-starlette | no unused lock per SSE stream |
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

from core.settings import Settings

log = logging.getLogger("core.fastpath")

PIECES = ("protocols", "direct", "redispy", "sse")
_state: dict[str, bool] = {}


def on(piece: str) -> bool:
    """Whether ``piece`` is in use in this process (checked at the first call)."""
    state = _state.get(piece)
    if state is None:
        state = _state[piece] = Settings.from_env().fast_path and not _warned(problems(piece), piece)
    return state


def turn_off(piece: str) -> None:
    _state[piece] = False


def status() -> dict[str, bool]:
    return {piece: on(piece) for piece in PIECES}


def problems(piece: str) -> list[str]:
    """What ``piece`` misses in the installed libraries (empty: it can be used)."""
    return check(importlib.import_module(f"{__name__}.{piece}"))


def _warned(found: list[str], piece: str) -> list[str]:
    if found:
        log.warning("fast path %r is off, the stock path is used: %s", piece, "; ".join(found))
    return found


def check(module: Any) -> list[str]:
    """The ``NEEDS`` and ``STAND_INS`` of a piece's module not met by the installed libraries."""
    found = []
    for library, owner, names in module.NEEDS:
        found += [f"{library} {version(library)}: {owner.__qualname__}.{name}" for name in names if not uses(owner, name)]
    for library, owner, real, stand_in in getattr(module, "STAND_INS", ()):
        wanted = code_names(owner) & public(real) - public(str) - public(bytes)  # not "".join etc.
        found += [
            f"{library} {version(library)}: {owner.__qualname__} calls {real.__name__}.{name}, which {stand_in.__name__} lacks"
            for name in sorted(wanted - public(stand_in))
        ]
    return found


def uses(owner: Any, name: str) -> bool:
    return hasattr(owner, name) or name in code_names(owner)


def code_names(owner: Any) -> set[str]:
    """The attribute and global names used by the code of a class (and its bases) or function."""
    functions = [value for cls in owner.__mro__ for value in vars(cls).values()] if isinstance(owner, type) else [owner]
    names: set[str] = set()
    for function in functions:
        code = getattr(getattr(function, "__func__", function), "__code__", None)
        if code is not None:
            names.update(code.co_names)
    return names


def public(kind: type) -> set[str]:
    return {name for name in dir(kind) if not name.startswith("_")}


def version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(stdlib)"
