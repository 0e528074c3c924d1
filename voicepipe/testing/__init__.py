"""Helpers for voicepipe's tests and latency benchmark (real speech, no fixtures on disk)."""
