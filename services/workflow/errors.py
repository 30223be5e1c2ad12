"""Errors of workflow definitions and their expressions."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from eventstore.errors import FlowlogError


class ExpressionError(FlowlogError):
    """An expression or template cannot be compiled or evaluated.

    ``expression`` is the source text, ``column`` the 1-based character position of the
    offending part within it (0 when the whole expression is meant), ``reason`` the bare message.
    """

    def __init__(self, reason: str, expression: str, column: int = 0) -> None:
        where = f" at column {column}" if column else ""
        super().__init__(f"{reason} (in expression {expression!r}{where})")
        self.reason = reason
        self.expression = expression
        self.column = column


class DefinitionIssue(msgspec.Struct, frozen=True):
    """One problem in a definition: the file, its 1-based line (0: the whole file), the field
    path (such as ``steps[1].retry.max_attempts``; empty for the document) and the message."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class DefinitionError(FlowlogError):
    """A workflow definition is invalid; ``issues`` lists every problem found, in line order."""

    def __init__(self, issues: Sequence[DefinitionIssue]) -> None:
        self.issues = tuple(sorted(issues, key=lambda issue: (issue.file, issue.line)))
        super().__init__("\n".join(str(issue) for issue in self.issues))
