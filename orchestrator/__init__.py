"""orchestrator: agentic ML research sessions that are reviewable and resumable."""

__version__ = "0.1.0"
