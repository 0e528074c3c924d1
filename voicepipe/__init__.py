"""voicepipe: a self-hosted, latency-first voice-agent server."""

__version__ = "0.1.0"
