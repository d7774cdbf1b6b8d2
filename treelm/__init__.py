"""TreeLM client SDK (gRPC). Imports neither torch nor Ray: ``from treelm import Client``."""

__version__ = "0.1.0"

__all__ = ["__version__"]
