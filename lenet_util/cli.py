"""The command-line conventions every lenet program shares: no abbreviated flags, help texts
without docstring markup that show each default as it would be typed, and a parse error as
one line."""

from __future__ import annotations

import argparse
import re
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

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")
