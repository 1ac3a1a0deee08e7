"""Error types of onnxws, one base class; the CLI maps each to an exit code (the README lists them)."""

from __future__ import annotations


class OnnxwsError(Exception):
    """Base class of every error onnxws raises on purpose.

    The message is one line meant for a user: it names the bad value, what was
    expected and how to fix it. ``exit_code`` is what the CLI exits with.
    """

    exit_code: int = 1


class InputError(OnnxwsError):
    """Bad input: unreadable model, data that does not match it, bad options (exit 1)."""

    exit_code = 1


class UsageError(OnnxwsError):
    """An invalid option value or combination found after parsing (exit 2)."""

    exit_code = 2


class NothingToShareError(InputError):
    """The model has no shareable weight tensor at all (exit 1)."""

    exit_code = 1


class BudgetError(OnnxwsError):
    """The model has shareable weights, but no layer can be shared within the budget (exit 3)."""

    exit_code = 3


class LimitError(OnnxwsError):
    """A limit the user set (``--time-budget``, ``--max-scorings``) stopped the run before any
    shared layer was verified within the budget (exit 4): the budget itself may be fine."""

    exit_code = 4


class VerificationError(OnnxwsError):
    """The emitted model does not reproduce what was scored: a bug, reported loudly (exit 1)."""

    exit_code = 1


class ScoringError(OnnxwsError):
    """Scoring could not go on for a reason outside the input: a worker process died (exit 1)."""

    exit_code = 1


class Interrupts:
    """Whether a KeyboardInterrupt came from the user (Ctrl-C, SIGTERM) or from code that raised it.

    The CLI installs handlers that ``note`` each signal before raising; while ``watching``, a
    KeyboardInterrupt no signal preceded was raised by code (a user metric) and is bad input.
    Without the CLI (the Python API) every KeyboardInterrupt is taken as real.
    """

    def __init__(self) -> None:
        self.watching = False
        self.received = False

    def note(self) -> None:
        self.received = True

    def is_real(self, exc: KeyboardInterrupt) -> bool:
        return not self.watching or self.received


interrupts = Interrupts()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line (whitespace runs collapsed), at most ``limit`` characters;
    the exception's type name when it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
