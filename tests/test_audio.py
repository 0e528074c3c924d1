"""voicepipe.audio: PCM16, G.711, wire encodings and resampling."""

from __future__ import annotations

import numpy as np
import pytest

from voicepipe import audio


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


# --- PCM16 ----------------------------------------------------------------------------------


def test_pcm16_round_trip_is_exact() -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    x = audio.pcm16_to_float(pcm.astype("<i2").tobytes())
    assert x.dtype == np.float32
    assert x.min() == -1.0 and x.max() < 1.0
    assert audio.float_to_pcm16(x) == pcm.astype("<i2").tobytes()


def test_pcm16_is_little_endian() -> None:
    assert audio.float_to_pcm16(np.array([0.5], np.float32)) == b"\x00\x40"
    assert audio.pcm16_to_float(b"\x00\xc0")[0] == -0.5


def test_float_to_pcm16_clips_out_of_range() -> None:
    raw = audio.float_to_pcm16(np.array([2.0, -2.0], np.float32))
    assert np.frombuffer(raw, "<i2").tolist() == [32767, -32768]


def test_odd_length_pcm16_is_rejected() -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        audio.pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="even number of bytes"):
        audio.decode_input(b"\x00", "pcm16", 24000)


# --- G.711 ----------------------------------------------------------------------------------


def test_ulaw_known_codes() -> None:
    # ITU-T G.711 / Sun g711.c reference values.
    assert audio.ulaw_encode_int16(np.array([0, 32767, -32768])).tolist() == [0xFF, 0x80, 0x00]
    assert audio.ulaw_decode_int16(np.array([0xFF, 0x7F, 0x80, 0x00])).tolist() == [
        0, 0, 32124, -32124,
    ]


def test_alaw_known_codes() -> None:
    assert audio.alaw_encode_int16(np.array([0, 32767, -32768])).tolist() == [0xD5, 0xAA, 0x2A]
    assert audio.alaw_decode_int16(np.array([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [
        8, -8, 32256, -32256,
    ]


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_decode_then_encode_is_identity(law: str) -> None:
    codes = np.arange(256, dtype=np.uint8)
    decode = getattr(audio, f"{law}_decode_int16")
    encode = getattr(audio, f"{law}_encode_int16")
    back = encode(decode(codes))
    if law == "ulaw":  # 0x7F and 0xFF both decode to 0, which encodes as 0xFF
        codes = np.where(codes == 0x7F, 0xFF, codes)
    assert back.tolist() == codes.tolist()


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_g711_round_trip_error_is_bounded(law: str) -> None:
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    decode = getattr(audio, f"{law}_decode_int16")
    encode = getattr(audio, f"{law}_encode_int16")
    back = decode(encode(pcm)).astype(np.int32)
    err = np.abs(back - pcm.astype(np.int32))
    mag = np.abs(pcm.astype(np.int32))
    # Logarithmic quantisation: at most half a step of 1/16 of the segment, i.e. about 3.5%
    # of the magnitude, and a few tens of units near zero.
    big = mag > 1024
    assert np.all(err[big] <= 0.036 * mag[big])
    assert np.all(err[~big] <= 36)


@pytest.mark.parametrize("encoding", ["g711_ulaw", "g711_alaw"])
def test_g711_keeps_a_tone(encoding: str) -> None:
    x = _sine(440.0, 8000, 0.5, amp=0.3)
    raw = audio.encode_output(x, encoding)
    assert len(raw) == len(x)
    y = audio.decode_input(raw, encoding, 8000)
    snr = 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))
    assert snr > 30  # G.711 gives about 38 dB on a loud tone


# --- wire encodings -------------------------------------------------------------------------


def test_encode_output_and_decode_input_pcm16() -> None:
    x = _sine(300.0, 24000, 0.1)
    raw = audio.encode_output(x, "pcm16")
    assert len(raw) == 2 * len(x)
    np.testing.assert_allclose(audio.decode_input(raw, "pcm16", 24000), x, atol=1 / 32768)


def test_unknown_encoding_and_wrong_g711_rate_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown audio encoding"):
        audio.decode_input(b"\x00\x00", "opus", 48000)
    with pytest.raises(ValueError, match="unknown audio encoding"):
        audio.encode_output(np.zeros(4, np.float32), "mp3")
    with pytest.raises(ValueError, match="8000 Hz"):
        audio.decode_input(b"\xff", "g711_ulaw", 16000)


# --- resampling ------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [(24000, 16000), (8000, 16000), (22050, 24000), (16000, 8000)])
def test_resample_keeps_a_sine_a_sine(src: int, dst: int) -> None:
    x = _sine(1000.0, src, 1.0)
    y = audio.resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(len(y) - dst) <= 1
    assert abs(_peak_frequency(y, dst) - 1000.0) <= 2.0
    ref = _sine(1000.0, dst, len(y) / dst)
    core = slice(dst // 10, -dst // 10)  # away from the filter's edges
    assert np.max(np.abs(y[core] - ref[core])) < 1e-3


def test_streaming_resampler_equals_one_shot() -> None:
    rng = np.random.default_rng(1)
    x = (_sine(440.0, 24000, 1.0) + 0.05 * rng.standard_normal(24000)).astype(np.float32)
    one_shot = audio.resample(x, 24000, 16000)
    r = audio.Resampler(24000, 16000)
    chunks = [r.process(x[i : i + 480]) for i in range(0, len(x), 480)]  # 20 ms chunks
    streamed = np.concatenate([*chunks, r.flush()])
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4)
    # After flush the resampler starts a fresh stream.
    again = np.concatenate([r.process(x), r.flush()])
    np.testing.assert_allclose(again, one_shot, atol=1e-4)


def test_resampler_with_equal_rates_passes_through() -> None:
    r = audio.Resampler(16000, 16000)
    x = _sine(100.0, 16000, 0.01)
    assert np.array_equal(r.process(x), x)
    assert len(r.flush()) == 0
