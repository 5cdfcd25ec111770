"""User-facing errors: what was wrong, where, and how to fix it. They pickle across Ray process boundaries."""

from __future__ import annotations

from dataclasses import dataclass

USAGE_EXIT_CODE = 2


@dataclass(frozen=True)
class Problem:
    """One problem in a sweep file or command line."""

    path: str  # key path as the user wrote it, e.g. "loss.target_layers" or "search.space[loss.margin_benign].low"
    message: str  # what is wrong
    value: object = None  # the offending value (None when missing)
    fix: str = ""  # how to fix it
    has_value: bool = True

    def render(self) -> str:
        where = self.path or "<file>"
        text = f"{where}: {self.message}"
        if self.has_value:
            text += f" (got {_short(self.value)})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(Exception):
    """An error the user can fix; the CLI prints it without a traceback and exits with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the message across pickling (Ray)
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class ConfigError(UserError):
    """All problems found in a sweep file, reported together."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        header = f"{len(self.problems)} problem(s) in {source or 'the sweep config'}:"
        super().__init__("\n".join([header] + ["  - " + p.render().replace("\n", "\n  ") for p in self.problems]))

    def __reduce__(self):
        return (type(self), (self.problems, self.source))
