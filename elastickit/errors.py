"""Re-export of the error hierarchy (defined in the lowest engine, `elastickit.checkpoint`)."""

from elastickit.checkpoint.errors import (
    CorruptCheckpointError,
    DataError,
    ElastickitError,
    IncompleteCheckpointError,
    RankFailure,
    RequestError,
    UnsupportedFormatError,
)

__all__ = [
    "CorruptCheckpointError",
    "DataError",
    "ElastickitError",
    "IncompleteCheckpointError",
    "RankFailure",
    "RequestError",
    "UnsupportedFormatError",
]
