"""Audio conversion, the one place for it: PCM16 and G.711 codecs, resampling, wire encodings.

Inside voicepipe audio is mono float32 in [-1, 1]; on the wire it is PCM16 little-endian or
8 kHz G.711 (μ-law / A-law), the encodings of the OpenAI Realtime API. G.711 uses 256-entry
decode tables and 14-bit (μ-law) / 13-bit (A-law) encode tables built once from the ITU-T
G.711 reference algorithm, so encoding and decoding are a single numpy indexing operation.
Resampling is soxr (high quality); `Resampler` keeps the filter state between chunks.
"""

from __future__ import annotations

import numpy as np
import soxr

ENCODINGS = ("pcm16", "g711_ulaw", "g711_alaw")
G711_RATE = 8000

_PCM_SCALE = 32768.0


def pcm16_to_float(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes to float32 in [-1, 1)."""
    if len(raw) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / np.float32(_PCM_SCALE)


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """Float audio to int16 samples: scaled by 32768, rounded, clipped."""
    y = np.rint(np.asarray(x, dtype=np.float32) * np.float32(_PCM_SCALE))
    return np.clip(y, -32768, 32767).astype(np.int16)


def float_to_pcm16(x: np.ndarray) -> bytes:
    """Float audio to little-endian signed 16-bit PCM bytes."""
    return float_to_int16(x).astype("<i2", copy=False).tobytes()


# --- G.711 -------------------------------------------------------------------------------------
# Tables follow the ITU-T G.711 reference code (Sun Microsystems g711.c).


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _ulaw_encode_table() -> np.ndarray:
    # Index: the int16 sample arithmetically shifted right by 2, plus 8192 (14-bit, 0..16383).
    pcm = np.arange(-8192, 8192, dtype=np.int32)
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _alaw_encode_table() -> np.ndarray:
    # Index: the int16 sample arithmetically shifted right by 3, plus 4096 (13-bit, 0..8191).
    pcm = np.arange(-4096, 4096, dtype=np.int32)
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return (code ^ mask).astype(np.uint8)


_ULAW_DECODE = _ulaw_decode_table()
_ULAW_ENCODE = _ulaw_encode_table()
_ALAW_DECODE = _alaw_decode_table()
_ALAW_ENCODE = _alaw_encode_table()
_ULAW_DECODE_F = _ULAW_DECODE.astype(np.float32) / np.float32(_PCM_SCALE)
_ALAW_DECODE_F = _ALAW_DECODE.astype(np.float32) / np.float32(_PCM_SCALE)


def ulaw_encode_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples to G.711 μ-law codes (uint8)."""
    return _ULAW_ENCODE[(np.asarray(pcm, dtype=np.int16) >> 2).astype(np.int32) + 8192]


def ulaw_decode_int16(codes: np.ndarray) -> np.ndarray:
    """G.711 μ-law codes (uint8) to int16 samples."""
    return _ULAW_DECODE[np.asarray(codes, dtype=np.uint8)]


def alaw_encode_int16(pcm: np.ndarray) -> np.ndarray:
    """int16 samples to G.711 A-law codes (uint8)."""
    return _ALAW_ENCODE[(np.asarray(pcm, dtype=np.int16) >> 3).astype(np.int32) + 4096]


def alaw_decode_int16(codes: np.ndarray) -> np.ndarray:
    """G.711 A-law codes (uint8) to int16 samples."""
    return _ALAW_DECODE[np.asarray(codes, dtype=np.uint8)]


def ulaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 μ-law bytes."""
    return ulaw_encode_int16(float_to_int16(x)).tobytes()


def ulaw_decode(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 μ-law bytes to float32 audio."""
    return _ULAW_DECODE_F[np.frombuffer(raw, dtype=np.uint8)]


def alaw_encode(x: np.ndarray) -> bytes:
    """Float audio to G.711 A-law bytes."""
    return alaw_encode_int16(float_to_int16(x)).tobytes()


def alaw_decode(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 A-law bytes to float32 audio."""
    return _ALAW_DECODE_F[np.frombuffer(raw, dtype=np.uint8)]


# --- wire encodings ----------------------------------------------------------------------------


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown audio encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_input(raw: bytes | bytearray | memoryview, encoding: str, rate: int) -> np.ndarray:
    """Client audio bytes to float32 samples at `rate` (no resampling).

    G.711 is 8 kHz by definition, so `rate` must be 8000 for it.
    """
    _check_encoding(encoding)
    if encoding == "pcm16":
        if rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate}")
        return pcm16_to_float(raw)
    if rate != G711_RATE:
        raise ValueError(f"{encoding} audio is {G711_RATE} Hz, got rate={rate}")
    return ulaw_decode(raw) if encoding == "g711_ulaw" else alaw_decode(raw)


def encode_output(x: np.ndarray, encoding: str) -> bytes:
    """Float audio (already at the wire rate) to bytes in `encoding`."""
    _check_encoding(encoding)
    if encoding == "pcm16":
        return float_to_pcm16(x)
    return ulaw_encode(x) if encoding == "g711_ulaw" else alaw_encode(x)


# --- resampling --------------------------------------------------------------------------------


def resample(x: np.ndarray, src: int, dst: int, quality: str = "HQ") -> np.ndarray:
    """Resample a whole mono signal at once."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if src == dst:
        return x
    return np.asarray(soxr.resample(x, src, dst, quality=quality), dtype=np.float32)


class Resampler:
    """Streaming mono resampler that keeps its filter state across chunks.

    `process` may return fewer samples than the rate ratio suggests (the filter's delay);
    `flush` returns the rest at the end of a stream and makes the resampler ready for a new one.
    Equal rates pass audio through untouched.
    """

    def __init__(self, src: int, dst: int, quality: str = "HQ") -> None:
        if src <= 0 or dst <= 0:
            raise ValueError(f"sample rates must be positive, got {src} -> {dst}")
        self.src = src
        self.dst = dst
        self._stream = None if src == dst else soxr.ResampleStream(src, dst, 1, "float32", quality)

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop buffered audio and filter state."""
        if self._stream is not None:
            self._stream.clear()
