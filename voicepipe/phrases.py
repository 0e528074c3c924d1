"""Cuts the LLM's streaming text into phrases for TTS, as early as the prosody allows.

A phrase ends after a sentence terminator (. ! ?), a clause mark (; :), a comma once the phrase
has a few words, or a newline, each followed by whitespace. A terminator at the very end of the
text so far is undecided until the next delta shows what follows, which is what keeps "3.5",
"e.g." and "Dr." whole. The first phrase of a reply may be a single word ("Sure.") because the
listener is waiting for it; later phrases need a few words so that TTS does not get lone
fragments. `flush` returns the rest when the reply ends.
"""

from __future__ import annotations

_SENTENCE = ".!?"
_CLAUSE = ";:"
_CLOSERS = "\"')]}»”’"
# Lower-case, without the final dot. Single letters and dotted runs ("e.g", "u.s") are
# recognised by shape.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc approx appt dept est fig inc ltd co corp no nos vol "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


def _is_abbreviation(word: str) -> bool:
    """`word` ends with the dot being judged, e.g. 'Dr.' or 'e.g.'."""
    core = word.lstrip("\"'([{«“‘").lower()[:-1]
    if not core:
        return False
    if core in _ABBREVIATIONS:
        return True
    parts = core.split(".")
    return all(len(p) == 1 and p.isalpha() for p in parts)  # "e.g", "u.s", initials "j"


class PhraseChunker:
    """Feed text deltas with `push`; it returns the phrases completed so far."""

    def __init__(
        self,
        first_min_words: int = 1,
        sentence_min_words: int = 2,
        min_words: int = 3,
        comma_min_words: int = 5,
        max_chars: int = 250,
    ) -> None:
        self.first_min_words = first_min_words
        self.sentence_min_words = sentence_min_words
        self.min_words = min_words  # for ; and :
        self.comma_min_words = comma_min_words
        self.max_chars = max_chars
        self._buf = ""
        self._scan = 0  # characters of _buf already judged not to end a phrase
        self._emitted = 0

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                break
            self._emit(cut, out)
        while len(self._buf) > self.max_chars:
            # A run-on without punctuation: cut at a space rather than wait forever.
            space = self._buf.rfind(" ", 0, self.max_chars + 1)
            if space <= 0:
                break
            self._emit(space, out)
        return out

    def flush(self) -> list[str]:
        """The remaining text as a last phrase (or nothing), and a fresh state."""
        rest = self._buf.strip()
        self.reset()
        return [rest] if rest else []

    def reset(self) -> None:
        self._buf = ""
        self._scan = 0
        self._emitted = 0

    def _emit(self, cut: int, out: list[str]) -> None:
        phrase = self._buf[:cut].strip()
        self._buf = self._buf[cut:].lstrip()
        self._scan = 0
        if phrase:
            out.append(phrase)
            self._emitted += 1

    def _find_cut(self) -> int | None:
        """Index just after the first phrase end in the buffer, or None."""
        buf = self._buf
        i = self._scan
        n = len(buf)
        while i < n:
            c = buf[i]
            if c == "\n":
                if buf[:i].strip():
                    return i
            elif c in _SENTENCE or c in _CLAUSE or c == ",":
                j = i + 1
                while j < n and buf[j] in _CLOSERS:
                    j += 1
                if j == n:
                    # Undecided until we see what follows; resume here next time.
                    self._scan = i
                    return None
                if buf[j].isspace() and self._ends_phrase(buf, i, j):
                    return j
            i += 1
        self._scan = n
        return None

    def _ends_phrase(self, buf: str, i: int, end: int) -> bool:
        mark = buf[i]
        words = len(buf[:end].split())
        first = self._emitted == 0
        if mark == ".":
            start = buf.rfind(" ", 0, i) + 1
            if _is_abbreviation(buf[start : i + 1]):
                return False
        if mark in _SENTENCE:
            return words >= (self.first_min_words if first else self.sentence_min_words)
        if mark in _CLAUSE:
            return words >= (max(2, self.first_min_words) if first else self.min_words)
        return words >= (max(2, self.first_min_words) if first else self.comma_min_words)
