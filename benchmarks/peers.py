"""The peer libraries the benchmarks compare against: zuko, nflows and sbi, the ``[bench]``
extra, not pyroflows' dependencies. A benchmark imports a peer only inside the function that
uses it; without the peer, a default run leaves its rows out with one printed note
(:func:`note_missing`), and a run that names it explicitly stops with a usage error
(:func:`require`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable

#: how to install the peers
INSTALL = "pip install -e '.[bench]'"
#: a table cell of a peer that is not installed
MISSING = "–"


def available(name: str) -> bool:
    """Whether the package ``name`` can be imported (``sys.modules[name] = None`` counts as
    missing, as it makes ``import name`` fail: how the tests take a peer away)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(names: Iterable[str]) -> list[str]:
    """The packages of ``names`` that are not installed, in order, each once."""
    return [n for n in dict.fromkeys(names) if not available(n)]


def missing_note(names: Iterable[str], what: str = "rows are left out") -> str:
    """One line saying which of ``names`` are missing and what becomes of their part of the
    table (empty when all are installed), e.g. "zuko not installed: its rows are left out
    (pip install -e '.[bench]')"."""
    gone = missing(names)
    if not gone:
        return ""
    their = "its" if len(gone) == 1 else "their"
    return f"{', '.join(gone)} not installed: {their} {what} ({INSTALL})"


def note_missing(names: Iterable[str], what: str = "rows are left out") -> list[str]:
    """Print :func:`missing_note` (to stderr, so stdout stays the table) where a peer is
    missing; return the missing ones."""
    names = list(names)
    note = missing_note(names, what)
    if note:
        print(note, file=sys.stderr, flush=True)
    return missing(names)


def require(parser, names: Iterable[str], asked: str = "") -> None:
    """Stop with ``parser.error`` if a peer the command line asks for explicitly is missing."""
    gone = missing(names)
    if gone:
        what = f" (asked for by {asked})" if asked else ""
        it = "it is" if len(gone) == 1 else "they are"
        parser.error(f"{', '.join(gone)} not installed{what}: {it} in the [bench] extra, "
                     f"{INSTALL}")


def version(name: str) -> str:
    """The package's ``__version__``, or "not installed"."""
    if not available(name):
        return "not installed"
    try:
        module = importlib.import_module(name)
    except ImportError:  # found but broken: as good as missing
        return "not installed"
    return str(getattr(module, "__version__", "?"))
