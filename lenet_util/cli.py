"""The command-line conventions every lenet program shares: no abbreviated flags, help texts
without docstring markup that show each default as it would be typed, and a parse error as
one line."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr):`~?([^`]+)`")


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (double backticks, roles)."""
    return _ROLE.sub(r"\1", text).replace("``", "")


def shown(value: Any) -> str:
    """A default as a user types it: lists comma-separated, paths as text."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@contextmanager
def stopping_on_interrupt() -> Iterator[None]:
    """While in the block, SIGINT (Ctrl-C) and SIGTERM end the program at once with one line
    and exit status 130 (a tool's entry point: it writes its outputs atomically, so nothing
    is lost, and an interrupt inside a framework's import would otherwise surface later as
    another error); the handlers before are restored after."""

    def stop(signum: int, frame: Any) -> None:
        print(f"{signal.Signals(signum).name}: interrupted; nothing was written",
              file=sys.stderr, flush=True)
        os._exit(130)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each flag's default as typed, except where there is none to show
    (None, an off switch, an empty list) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == () or default == []
                or default is argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: {shown(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with the conventions above."""

    def __init__(self, prog: str, description: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=plain(description) if description else None,
                         **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's, after making the terminal's streams print what they cannot encode as
        escapes (a terminal of ``PYTHONIOENCODING=ascii`` shows ``\\xd7`` for a ×) rather
        than end the program in a traceback."""
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        return super().parse_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flags = [f for f in self._option_string_actions if f.startswith("--")]
            for given in message.split(":", 1)[1].split():
                if given.startswith("--"):
                    near = difflib.get_close_matches(given.split("=")[0], flags, n=1)
                    if near:
                        message += f" (did you mean {near[0]}?)"
                        break
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")
