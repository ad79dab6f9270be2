"""The one error hierarchy of elastickit.

It lives in the lowest engine (`elastickit.checkpoint`) so that every part can raise it without
breaking the one-way imports; `elastickit.errors` re-exports it. Every message is one sentence
that names the file, tensor or flag and says what to do. The CLI maps `DataError` to exit code 1
and `RequestError` to exit code 2.
"""

from __future__ import annotations


class ElastickitError(Exception):
    """Base of every error elastickit raises on purpose.

    Attributes:
        path: the file or directory concerned, when there is one.
        tensor: the logical tensor concerned, when there is one.
        rank: the rank concerned, when there is one.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        tensor: str | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.tensor = tensor
        self.rank = rank


class DataError(ElastickitError):
    """The data is bad: corruption, a missing file, a mismatch with what was expected."""

    exit_code = 1


class MismatchError(DataError):
    """The checkpoint and the state it is restored into disagree (tensor names, shapes, dtype
    kinds). Not corruption: an older checkpoint of the same run would not fit either, so restore
    raises it at once instead of falling back."""


class CorruptCheckpointError(DataError):
    """A file's bytes do not match the checksum the manifest recorded, or a file is missing."""


class IncompleteCheckpointError(DataError):
    """A checkpoint directory has no committed manifest."""


class UnsupportedFormatError(DataError):
    """A manifest of a format or major version this build cannot read."""


class NotDurableError(ElastickitError):
    """A checkpoint did not reach every tier it was meant for (`wait()` and `close()` raise it).

    Attributes:
        step: the checkpoint's step.
        tiers: the tiers that failed to commit it.
    """

    def __init__(self, message: str, *, step: int, tiers: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.tiers = tiers


class RequestError(ElastickitError):
    """The request is bad: a wrong flag, an unknown layout, a path that does not exist."""

    exit_code = 2


class RankFailure(ElastickitError):
    """A collective step (save, restore) failed on one or more ranks; raised on every rank.

    Attributes:
        causes: rank -> one-sentence cause, for every rank that failed.
    """

    def __init__(self, message: str, *, causes: dict[int, str]) -> None:
        super().__init__(message)
        self.causes = dict(causes)
