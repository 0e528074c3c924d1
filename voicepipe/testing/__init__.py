"""Helpers for voicepipe's tests and latency benchmark (real speech, no fixtures on disk)."""


def unavailable(reason: str) -> None:
    """A test's dependency (a package, a binary, model weights) is missing: skip the test on a
    developer's machine, but fail it in CI (`CI` set), where `make test` installs everything."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason} (in CI every test dependency must be installed)")
    pytest.skip(reason)
