"""Audio helpers of the client: WAV reading, resampling, PCM16 and G.711 conversion (numpy only).

Samples travel as float64 arrays in [-1, 1] between these helpers and leave as bytes in the
session's wire format.
"""

from __future__ import annotations

import math
import os
import struct
import wave
from functools import lru_cache

import numpy as np

__all__ = [
    "alaw_decode",
    "alaw_encode",
    "float_to_pcm16",
    "from_wire",
    "load_wav",
    "resample",
    "save_wav",
    "to_float",
    "to_wire",
    "ulaw_decode",
    "ulaw_encode",
]


def load_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a WAV file as mono float64 in [-1, 1] and its sample rate.

    Handles PCM of 8, 16, 24 and 32 bits, 32/64-bit IEEE float and WAVE_FORMAT_EXTENSIBLE;
    several channels are averaged to mono.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{os.fspath(path)}: not a RIFF/WAVE file")
    fmt = None
    samples = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == 0xFFFE and len(body) >= 26:  # extensible: real tag opens the sub-format GUID
                tag = struct.unpack_from("<H", body, 24)[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise ValueError(f"{os.fspath(path)}: missing fmt or data chunk")
    tag, channels, rate, bits = fmt
    width = bits // 8
    usable = len(samples) - len(samples) % (width * channels)
    raw = samples[:usable]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float64) / float(1 << 23)
    elif tag == 1 and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float64)
    else:
        raise ValueError(f"{os.fspath(path)}: unsupported WAV format tag {tag} with {bits} bits")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return np.clip(x, -1.0, 1.0), rate


def to_float(audio: np.ndarray) -> np.ndarray:
    """Mono float64 in [-1, 1] from an int16 or float array; (n, channels) is averaged."""
    a = np.asarray(audio)
    if a.dtype == np.int16:
        f = a.astype(np.float64) / 32768.0
    elif a.dtype.kind == "f":
        f = a.astype(np.float64)
    else:
        raise TypeError(f"audio arrays must be int16 or float, not {a.dtype}")
    if f.ndim == 2:
        f = f.mean(axis=1)
    elif f.ndim != 1:
        raise ValueError("audio must be a 1-D array (or 2-D samples x channels)")
    return np.clip(f, -1.0, 1.0)


# Kaiser-windowed sinc with 16 zero crossings a side: about 80 dB of stopband, flat to 0.9 of
# the lower Nyquist frequency. Polyphase: one kernel row per output phase when the ratio is small.
_ZEROS = 16
_BETA = 8.6
_ROLLOFF = 0.92


def _kernel(offsets: np.ndarray, cutoff: float, half: int) -> np.ndarray:
    # offsets: distance in input samples between the output instant and each input sample.
    w = np.zeros_like(offsets)
    inside = np.abs(offsets) < half
    r = offsets[inside] / half
    w[inside] = np.i0(_BETA * np.sqrt(1.0 - r * r)) / np.i0(_BETA)
    return np.asarray(cutoff * np.sinc(cutoff * offsets) * w)


@lru_cache(maxsize=16)
def _phase_table(up: int, down: int, cutoff: float, half: int) -> np.ndarray:
    frac = np.arange(up)[:, None] / up
    taps = np.arange(2 * half)[None, :]
    return _kernel(frac + (half - 1) - taps, cutoff, half)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling of a float signal (windowed-sinc, polyphase for rational ratios)."""
    x = np.asarray(x, dtype=np.float64)
    if src_rate == dst_rate or len(x) == 0:
        return x.copy()
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    cutoff = min(1.0, dst_rate / src_rate) * _ROLLOFF
    half = math.ceil(_ZEROS / cutoff)
    n_out = -(-len(x) * up // down)
    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    table = _phase_table(up, down, cutoff, half) if up <= 4096 else None
    out = np.empty(n_out)
    taps = np.arange(2 * half)
    step = max(1, (1 << 20) // (2 * half))  # bound the gather matrix to ~8 MB
    for start in range(0, n_out, step):
        n = np.arange(start, min(start + step, n_out), dtype=np.int64)
        pos = n * down
        base, phase = pos // up, pos % up
        # Input sample base - half + 1 + j sits at padded index base + 1 + j.
        idx = base[:, None] + 1 + taps[None, :]
        if table is not None:
            k = table[phase]
        else:
            k = _kernel((phase / up)[:, None] + (half - 1) - taps[None, :], cutoff, half)
        out[start : start + len(n)] = np.einsum("ij,ij->i", padded[idx], k)
    return out


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """int16 samples from float; the inverse of `to_float` on int16 input, exactly."""
    return np.clip(np.round(np.asarray(x) * 32768.0), -32768, 32767).astype(np.int16)


def save_wav(path: str | os.PathLike[str], audio: np.ndarray, sample_rate: int) -> None:
    """Write mono audio (int16, or float in [-1, 1]) as a 16-bit PCM WAV file."""
    pcm = np.asarray(audio)
    if pcm.dtype != np.int16:
        pcm = float_to_pcm16(to_float(pcm))
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 mu-law bytes from int16 samples."""
    s = pcm.astype(np.int32) >> 2  # 14-bit, floored before the sign is taken (as in g711.c)
    sign = np.where(s < 0, 0x80, 0)
    mag = (np.minimum(np.abs(s), 8159) + 0x21) << 2
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    mant = np.where(exp > 7, 0x0F, (mag >> (np.minimum(exp, 7) + 3)) & 0x0F)
    exp = np.minimum(exp, 7)
    return bytes((~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes())


def ulaw_decode(data: bytes) -> np.ndarray:
    """int16 samples from G.711 mu-law bytes."""
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    exp, mant = (u >> 4) & 0x07, u & 0x0F
    mag = ((mant << 3) + 0x84) << exp
    return np.where(u & 0x80, 0x84 - mag, mag - 0x84).astype(np.int16)


def alaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 A-law bytes from int16 samples."""
    s = pcm.astype(np.int32) >> 3  # 13-bit
    sign = np.where(s >= 0, 0x80, 0)
    mag = np.minimum(np.where(s >= 0, s, -s - 1), 0x0FFF)
    exp = np.where(mag < 32, 0, np.floor(np.log2(np.maximum(mag, 1))).astype(np.int32) - 4)
    mant = np.where(exp == 0, mag >> 1, mag >> exp) & 0x0F
    return bytes(((sign | (exp << 4) | mant) ^ 0x55).astype(np.uint8).tobytes())


def alaw_decode(data: bytes) -> np.ndarray:
    """int16 samples from G.711 A-law bytes."""
    a = np.frombuffer(data, np.uint8).astype(np.int32) ^ 0x55
    exp, mant = (a >> 4) & 0x07, a & 0x0F
    mag = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    return np.where(a & 0x80, mag, -mag).astype(np.int16)


def to_wire(x: np.ndarray, encoding: str) -> bytes:
    """Float samples (already at the wire rate) as bytes of a wire encoding."""
    pcm = float_to_pcm16(x)
    if encoding == "pcm16":
        return pcm.astype("<i2").tobytes()
    if encoding == "g711_ulaw":
        return ulaw_encode(pcm)
    if encoding == "g711_alaw":
        return alaw_encode(pcm)
    raise ValueError(f"unknown audio encoding {encoding!r}")


def from_wire(data: bytes, encoding: str) -> np.ndarray:
    """int16 samples from bytes of a wire encoding."""
    if encoding == "pcm16":
        return np.frombuffer(data[: len(data) - len(data) % 2], "<i2").astype(np.int16)
    if encoding == "g711_ulaw":
        return ulaw_decode(data)
    if encoding == "g711_alaw":
        return alaw_decode(data)
    raise ValueError(f"unknown audio encoding {encoding!r}")
