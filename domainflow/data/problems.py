"""How bad data is reported: one error, every problem, each with file, line and column.

Why collect instead of raising at the first bad row: stopping at the first one makes a user fix
a file one row per run; listing the first few of each kind, with a count, shows the pattern at
once. The reader (:mod:`.tables`) and the checks (:mod:`.validation`) report through the same
collector, so every data message has the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

MAX_LISTED = 10  # problems of one kind listed in an error message; the rest are counted


class DataValidationError(ValueError):
    """Input data that no retry can fix.

    The message names the file, the line or row, the column and the problem, so a user
    can fix the data without reading code. ``problems`` holds one line per kind of problem.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        # One positional argument keeps the exception rebuildable from its message,
        # which is how Prefect's JSON serializer restores a failed task's exception.
        super().__init__(message)
        self.problems = list(problems) or [message]


def clip(text: Any, limit: int = 60) -> str:
    """A short repr for messages: a 2,000-character text must not bury the line number."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


Key = tuple[str, str | None, str]


@dataclass
class Problems:
    """Collects problems grouped by (source, column, kind) so one error reports them all."""

    groups: dict[Key, list[str]] = field(default_factory=dict)
    hints: dict[Key, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(
        self, source: str, column: str | None, kind: str, item: str = "", *, hint: str = "", note: str = ""
    ) -> None:
        """Record one occurrence (``item``, e.g. ``"line 7 ('x')"``) of a kind of problem."""
        key = (source, column, kind)
        items = self.groups.setdefault(key, [])
        if item:
            items.append(item)
        if hint:
            self.hints[key] = hint
        if note and note not in self.notes:
            self.notes.append(note)

    def raise_if_any(self) -> None:
        """Raise one :class:`DataValidationError` describing every kind collected so far."""
        if not self.groups:
            return
        lines = [self._describe(key, items) for key, items in self.groups.items()]
        if len(lines) == 1:
            message = lines[0]
        else:
            message = f"{len(lines)} kinds of data problems:\n- " + "\n- ".join(lines)
        if self.notes:
            message += "\n(" + "; ".join(self.notes) + ")"
        raise DataValidationError(message, problems=lines)

    def _describe(self, key: Key, items: list[str]) -> str:
        source, column, kind = key
        text = source + (f", column {column!r}" if column else "") + f": {kind}"
        if items:
            shown = "; ".join(items[:MAX_LISTED])
            more = f"; … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            text += f" ({len(items)} found): {shown}{more}"
        if key in self.hints:
            text += f". {self.hints[key]}"
        return text
