"""PhraseChunker: phrases for TTS from streaming LLM text."""

from __future__ import annotations

import pytest

from voicepipe.phrases import PhraseChunker


def chunk(text: str, step: int = 3, **kwargs: int) -> list[str]:
    """Feed `text` in deltas of `step` characters; return every phrase, the flush included."""
    c = PhraseChunker(**kwargs)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += c.push(text[i : i + step])
    return out + c.flush()


def test_sentences_become_phrases_as_soon_as_they_end() -> None:
    c = PhraseChunker()
    assert c.push("The capital of France") == []
    assert c.push(" is Paris.") == []  # undecided until what follows the dot is seen
    assert c.push(" It is") == ["The capital of France is Paris."]
    assert c.push(" big!") == []
    assert c.flush() == ["It is big!"]
    assert c.flush() == []


def test_first_phrase_may_be_one_word_but_later_ones_may_not() -> None:
    assert chunk("Sure. I can help with that. Yes. Tell me more.") == [
        "Sure.",
        "I can help with that.",
        "Yes. Tell me more.",
    ]


def test_clauses_and_long_comma_phrases_split() -> None:
    text = (
        "Here is the plan: first we walk to the station, then we take the train to Lyon; "
        "after that, we rest."
    )
    assert chunk(text) == [
        "Here is the plan:",
        "first we walk to the station,",
        "then we take the train to Lyon;",
        "after that, we rest.",
    ]


def test_short_comma_phrases_do_not_split() -> None:
    assert chunk("Sure. Well, I think so, yes.") == ["Sure.", "Well, I think so, yes."]


def test_first_phrase_may_end_at_an_early_comma() -> None:
    assert chunk("Well, I think so, yes.") == ["Well, I think so,", "yes."]


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith will see you at 3.30 today.",
        "Fruit e.g. apples and pears is good for you.",
        "It costs $3.50 per kilo in the U.S. market.",
        "The value of pi is about 3.14159 in decimal notation.",
        "We meet at 10:30 in room 4.",
        "Mr. and Mrs. Jones arrived at noon.",
    ],
)
def test_abbreviations_decimals_and_times_stay_whole(text: str) -> None:
    assert chunk(text) == [text]


def test_closing_quotes_and_brackets_stay_with_their_sentence() -> None:
    assert chunk('She said "hello there." Then she left (quietly.) The end.') == [
        'She said "hello there."',
        "Then she left (quietly.)",
        "The end.",
    ]


def test_newlines_end_phrases() -> None:
    assert chunk("Options:\n- tea\n- coffee") == ["Options:", "- tea", "- coffee"]


@pytest.mark.parametrize("step", [1, 2, 5, 17, 1000])
def test_result_does_not_depend_on_delta_boundaries(step: int) -> None:
    text = (
        "Sure! Paris is the capital of France, with about 2.1 million people, e.g. in the "
        "city itself. Dr. Lee agrees; she lived there for years. OK."
    )
    assert chunk(text, step) == chunk(text, 1)
    assert " ".join(chunk(text, step)) == text


def test_run_on_text_is_cut_at_a_space() -> None:
    words = " ".join(f"word{i}" for i in range(40))
    phrases = chunk(words, 7, max_chars=60)
    assert len(phrases) > 1
    assert all(len(p) <= 60 for p in phrases[:-1])
    assert " ".join(phrases) == words


def test_reset_starts_a_new_reply() -> None:
    c = PhraseChunker()
    c.push("Half a sent")
    c.reset()
    assert c.push("Hi. ") == ["Hi."]  # the first phrase of the new reply may be short
