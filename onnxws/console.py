"""All text a user sees in a terminal goes through here: verbatim, never markup, never raw control characters.

Message text carries user-controlled strings (paths, tensor names, option values, a metric's
exception), so it is never read as rich markup (``[/x]`` in a path must not crash the error
handler, ``exp[v2]/`` must print as written) and its control characters are shown escaped
(``\\x1b``, ``\\n``, ``\\u202e``) so a tensor name can neither drive the terminal nor forge a line.
``printable`` is the same rule for the other outputs (tables, plots, the HTML report).
"""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from typing import Any

from rich.console import Console
from rich.text import Text

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})  # controls, format (bidi), separators, unassigned


def printable(text: object) -> str:
    """``str(text)`` with every control, format or line-separator character written as an escape
    (``\\n``, ``\\x1b``, ``\\u202e``); everything else unchanged."""
    value = str(text)
    if value.isprintable():  # the common case, and fast
        return value
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE else c for c in value)


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def message_line(text: object) -> str:
    """A message as one printable line: whitespace runs (newlines included) collapsed, the rest escaped."""
    return printable(" ".join(str(text).split()))


def plain(text: object, style: str = "") -> Text:
    """A rich ``Text`` that shows ``text`` verbatim (escaped as ``printable``), never parsed as markup."""
    return Text(printable(text), style=style)


class Terminal:
    """The two streams of the CLI: stderr for people (progress, tables, errors), stdout for results
    (``--json`` objects, listings). ``json_errors``: errors are also one JSON object on stdout."""

    def __init__(self) -> None:
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)
        self.json_errors = False

    def error(self, message: object, exit_code: int) -> None:
        """``error: <message>`` as one verbatim line on stderr (and the JSON object when asked)."""
        line = message_line(message)
        self.err.print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True)
        if self.json_errors:
            self.result({"error": line, "exit_code": exit_code})

    def note(self, message: object, style: str = "") -> None:
        """One verbatim line for people, on stderr."""
        self.err.print(plain(message_line(message), style), soft_wrap=True)

    def result(self, obj: Any) -> None:
        """One JSON object on stdout (a user metric's prints are captured and never land there)."""
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()


class PrintableFormatter(logging.Formatter):
    """Log records as ``LEVEL name: message`` with the message escaped like ``printable``
    (warnings carry tensor names and paths)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        head, _, tail = text.partition("\n")  # a traceback (--debug) keeps its lines
        return printable(head) + ("\n" + tail if tail else "")


terminal = Terminal()
