"""group-worker: a stream-processing worker for Segment-spec ``group`` calls on Kafka."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("group-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
