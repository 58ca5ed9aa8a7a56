"""stablews: an observability-first WebSocket service for real-time data."""

__version__ = "0.1.0"

__all__ = ["__version__"]
