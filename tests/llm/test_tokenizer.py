"""ChatTokenizer: BPE from GGUF metadata, incremental detokenization, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicepipe.llm.gguf import load_gguf
from voicepipe.llm.tokenizer import ChatTokenizer, IncrementalDecoder, TokenizerError

from .tiny import CHATML, SPECIALS, tiny_vocab

TEXTS = [
    "Hello world",
    "The year 2024 cost $1,234.56!",
    "  leading spaces\n\nnew lines\ttabs  ",
    "héllo wörld 世界 🎉",
    "I'm sure they'll say we'VE done it",
    "def f(x):\n    return x**2\n",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def _tiny(pre_name: str = "smollm") -> ChatTokenizer:
    tokens, merges, types = tiny_vocab()
    return ChatTokenizer.from_gguf_vocab(
        model="gpt2", pre_name=pre_name, tokens=tokens, merges=merges, token_types=types,
        bos_id=0, eos_id=2, chat_template=CHATML,
    )


@pytest.mark.parametrize("pre_name", ["smollm", "qwen2", "gpt-2", "llama-bpe"])
def test_round_trip_and_special_tokens(pre_name: str) -> None:
    tok = _tiny(pre_name)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nthe<|im_end|>")
    assert ids[0] == SPECIALS.index("<|im_start|>") and ids[-1] == SPECIALS.index("<|im_end|>")
    assert tok.decode(ids, skip_special=True) == "user\nthe"


def test_unknown_tokenizer_kinds_are_refused() -> None:
    tokens, merges, types = tiny_vocab()
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        ChatTokenizer.from_gguf_vocab(model="gpt2", pre_name="mystery", tokens=tokens,
                                      merges=merges, token_types=types, bos_id=0, eos_id=2)
    with pytest.raises(TokenizerError, match="model"):
        ChatTokenizer.from_gguf_vocab(model="llama", pre_name="default", tokens=tokens,
                                      merges=merges, token_types=types, bos_id=0, eos_id=2)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_incremental_decoding_never_splits_a_character(text: str) -> None:
    tok = _tiny()  # bytes are single tokens here, so multi-byte characters span tokens
    ids = tok.encode(text)
    detok = IncrementalDecoder(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    for delta in deltas:
        if "\ufffd" in delta:
            assert "\ufffd" in text
    assert "".join(deltas) == tok.decode(ids, skip_special=True)


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30), st.data())
def test_byte_level_decoding_splits_where_the_tail_is_clean(
    a: str, b: str, data: st.DataObject
) -> None:
    """`byte_level`'s promise, which lets a conversation skip decoding its whole history when
    it looks for where a changed prompt diverges: wherever the ids are cut, if the tail decodes
    without U+FFFD, the head decodes to the text before it."""
    tok = _tiny()  # bytes are single tokens here, so cuts fall inside characters too
    assert tok.byte_level
    ids = tok.encode(a + "<|im_end|>" + b)
    cut = data.draw(st.integers(0, len(ids)))
    text, tail = tok.decode(ids), tok.decode(ids[cut:])
    if "\ufffd" not in tail:
        assert tok.decode(ids[:cut]) == text[: len(text) - len(tail)]


def test_chat_template_helpers() -> None:
    tok = _tiny()
    tok.chat_template = (
        "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}"
        "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}"
    )
    assert tok.render([{"role": "user", "content": "é"}], add_generation_prompt=False) == (
        '{"role": "user", "content": "é"}|4'
    )
    with pytest.raises(TokenizerError, match="no messages"):
        tok.render([], add_generation_prompt=True)


def test_hf_folder_tokenizer(tmp_path: Path) -> None:
    tok = _tiny()
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}
    ))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = ChatTokenizer.from_hf_folder(tmp_path)
    assert loaded.eos_id == 2 and loaded.stop_ids == {0, 2}
    assert loaded.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert loaded.render([{"role": "user", "content": "x"}], add_generation_prompt=True) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.models
def test_smollm_tokenizer_matches_transformers(smollm_path: Path) -> None:
    import transformers

    tok = load_gguf(smollm_path).tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name
    )
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert len(tok.encode("12345")) == 5  # smollm splits digits one by one


@pytest.mark.models
def test_smollm_chat_template(smollm_path: Path) -> None:
    tok = load_gguf(smollm_path).tokenizer
    assert tok.token_text(1) == "<|im_start|>" and tok.token_text(2) == "<|im_end|>"
    assert tok.eos_id == 2 and 2 in tok.stop_ids
    messages = [{"role": "user", "content": "Hi there"}]
    text = tok.render(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tok.render(with_system, add_generation_prompt=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )
