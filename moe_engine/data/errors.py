"""Errors of the data stage.

Every problem a user can cause (bad input, corrupted output) is raised as a `DataError`
subclass (a `moe_engine.errors.UserError`; bad settings raise the shared `ConfigError`) whose
message alone says what is wrong and where; the CLI prints that message and exits 2 instead of
showing a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_engine.errors import ConfigError, UserError

__all__ = ["ConfigError", "DataError", "IngestError", "TokenizerError", "RuleFailure", "DataValidationError",
           "ShardIntegrityError"]


class DataError(UserError):
    """Base class: a data problem with a message fit for a user."""


class IngestError(DataError):
    """An input could not be read as documents (missing field, bad JSON, bad archive...)."""


class TokenizerError(DataError):
    """A tokenizer could not be trained, loaded or used."""


@dataclass(frozen=True)
class RuleFailure:
    """One broken rule: what, how often, in which files, a few examples."""

    rule: str  # short stable name, e.g. "duplicate_share"
    description: str  # the rule with its limit, e.g. "share of duplicate documents <= 0.01"
    count: int  # offending documents / tokens / shards
    files: tuple[str, ...] = ()
    examples: tuple[str, ...] = field(default_factory=tuple)

    def format(self, max_files: int = 3) -> str:
        files = ", ".join(self.files[:max_files])
        if len(self.files) > max_files:
            files += f" (+{len(self.files) - max_files} more)"
        line = f"  - {self.rule}: {self.count} failing ({self.description})"
        if files:
            line += f"\n      in: {files}"
        for example in self.examples:
            line += f"\n      e.g. {example}"
        return line


class DataValidationError(DataError):
    """One or more validation rules failed; `failures` holds them, `report` the Data Docs."""

    title = "data validation failed"

    def __init__(self, failures: list[RuleFailure], report: str | None = None):
        self.failures = list(failures)
        self.report = report
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"{self.title}: {len(self.failures)} rule(s) broken"]
        lines += [f.format() for f in self.failures]
        if self.report:
            lines.append(f"  report: {self.report}")
        return "\n".join(lines)

    def with_report(self, report: str) -> "DataValidationError":
        """The same failures, pointing at a report that moved."""
        return type(self)(self.failures, report)


class ShardIntegrityError(DataValidationError):
    """Written shards do not match their manifest (truncated, hash, dtype, ids >= vocab)."""

    title = "shard integrity check failed"
