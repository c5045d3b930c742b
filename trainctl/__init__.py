"""trainctl: an event-driven training kernel for language models."""

__version__ = "0.1.0"
