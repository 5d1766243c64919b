"""The Genstruct gRPC service: settings, prompt, engine, servicer and command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genstruct-grpc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
