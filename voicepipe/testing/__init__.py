"""Helpers for voicepipe's tests and latency benchmark (real speech, no fixtures on disk)."""


def unavailable(reason: str) -> None:
    """A test's dependency (a package, a binary, model weights) is missing: skip the test on a
    developer's machine, but fail it in CI (`CI` set), where `make test` installs everything."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason} (in CI every test dependency must be installed)")
    pytest.skip(reason)


def require_cpu_attention() -> None:
    """The fused bf16 CPU attention kernel must load. Only a CPU without AVX512-BF16 skips (CI
    included: no install step can add an instruction set); anything else missing is
    `unavailable`."""
    import pytest

    from voicepipe.kernels import cpu_attention

    if cpu_attention.available():
        return
    lacks = cpu_attention.cpu_lacks_bf16()
    if lacks:
        pytest.skip(f"{lacks}: the kernel cannot run on this machine")
    unavailable(f"bf16 CPU attention kernel: {cpu_attention.unavailable_reason()}")
