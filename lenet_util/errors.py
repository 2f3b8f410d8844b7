"""The one exception type every lenet error derives from."""

from __future__ import annotations

EXIT_BAD_INPUT = 2
"""A flag, setting, file, dataset or checkpoint that cannot be used."""


class LenetError(Exception):
    """A problem the user can fix, as one line naming the file, layer, flag or setting and what
    is wrong with it. Libraries raise it; only a program's entry point prints it (``error:``
    and the message) and exits with :attr:`exit_code`."""

    exit_code: int = EXIT_BAD_INPUT
    """The status a program exits with when this error ends it."""

    def __init__(self, message: str = "", *, everyone: bool = False) -> None:
        super().__init__(message)
        self.everyone = everyone
        """In a run of several processes: every process meets this error at the same point (so
        they may leave together), rather than this process alone (which then leaves at once)."""

    def line(self) -> str | None:
        """What a program prints for this error (None: nothing)."""
        return f"error: {self}"
