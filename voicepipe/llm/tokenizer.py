"""The model's tokenizer and chat template, from GGUF metadata or a Hugging Face folder.

`ChatTokenizer` wraps a byte-level BPE of the `tokenizers` library (built from GGUF vocab and
merges with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, or read from
`tokenizer.json`), knows the special and end-of-turn ids, renders the chat template with jinja2
the way transformers does, and turns a stream of ids into text deltas that never split a
UTF-8 character (`IncrementalDecoder`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers as pre


class TokenizerError(ValueError):
    """The tokenizer or chat template of a model cannot be built or rendered."""


# Pre-tokenizer regexes as llama.cpp (llama-vocab.cpp) and the upstream tokenizer.json use them.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer names that split digits one by one before the GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "jais", "phi-2", "poro-chat", "viking"}

# Token strings that end an assistant turn in the common chat formats.
_END_OF_TURN = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "</s>",
)

# GGUF token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer(name: str) -> tuple[pre.PreTokenizer, normalizers.Normalizer | None]:
    if name == "qwen2":
        split = pre.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False)
        return (
            pre.Sequence([split, pre.ByteLevel(add_prefix_space=False, use_regex=False)]),
            normalizers.NFC(),
        )
    if name in ("llama-bpe", "llama3"):
        split = pre.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False)
        return pre.Sequence([split, pre.ByteLevel(add_prefix_space=False, use_regex=False)]), None
    if name in _DIGIT_SPLIT_PRE:
        return (
            pre.Sequence(
                [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)]
            ),
            None,
        )
    if name in _GPT2_PRE:
        return pre.ByteLevel(add_prefix_space=False), None
    raise TokenizerError(f"unsupported GGUF pre-tokenizer {name!r}")


@dataclass
class ChatTokenizer:
    """Encode/decode, special ids and the chat template of one model."""

    tokenizer: Tokenizer
    chat_template: str
    bos_token: str = ""
    eos_token: str = ""
    eos_id: int | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    add_bos: bool = False

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf_vocab(
        cls,
        *,
        model: str,
        pre_name: str,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        bos_id: int | None,
        eos_id: int | None,
        eot_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> ChatTokenizer:
        """A byte-level BPE from the `tokenizer.ggml.*` metadata of a GGUF file."""
        if model != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} (need 'gpt2' BPE)")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TokenizerError(f"malformed merge {merge!r}")
            pairs.append((left, right))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        pre_tokenizer, normalizer = _pre_tokenizer(pre_name)
        tok.pre_tokenizer = pre_tokenizer
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.decoder = decoders.ByteLevel()
        added = [
            AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
            for i, t in enumerate(token_types)
            if t in (_CONTROL, _USER_DEFINED)
        ]
        # add_tokens keeps each token's existing id because the content is already in the vocab.
        tok.add_tokens([a for a in added if not a.special])
        tok.add_special_tokens([a for a in added if a.special])
        stop = {eos_id} if eos_id is not None else set()
        if eot_id is not None:
            stop.add(eot_id)
        stop |= {vocab[s] for s in _END_OF_TURN if s in vocab}
        return cls(
            tokenizer=tok,
            chat_template=chat_template or _CHATML,
            bos_token=tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else "",
            eos_token=tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else "",
            eos_id=eos_id,
            stop_ids=frozenset(stop),
            add_bos=add_bos,
        )

    @classmethod
    def from_hf_folder(cls, folder: Path) -> ChatTokenizer:
        """From `tokenizer.json`, `tokenizer_config.json` (or `chat_template.jinja`) and the
        eos ids of `generation_config.json` / `config.json`."""
        path = folder / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{folder.name}: tokenizer.json is missing")
        tok = Tokenizer.from_file(str(path))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = folder / "chat_template.jinja"
        if not template and jinja.exists():
            template = jinja.read_text()

        def token_text(value: Any) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        bos_token = token_text(cfg.get("bos_token"))
        eos_token = token_text(cfg.get("eos_token"))
        eos_id = tok.token_to_id(eos_token) if eos_token else None
        stop: set[int] = {eos_id} if eos_id is not None else set()
        for name in ("generation_config.json", "config.json"):
            ids = _read_json(folder / name).get("eos_token_id")
            if isinstance(ids, int):
                ids = [ids]
            stop.update(i for i in ids or [] if isinstance(i, int))
        for text in _END_OF_TURN:
            tid = tok.token_to_id(text)
            if tid is not None:
                stop.add(tid)
        return cls(
            tokenizer=tok,
            chat_template=template or _CHATML,
            bos_token=bos_token,
            eos_token=eos_token,
            eos_id=eos_id,
            stop_ids=frozenset(stop),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    def save(self, folder: Path) -> None:
        """Write `tokenizer.json` and `chat.json` (read back by `load`)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        meta = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "stop_ids": sorted(self.stop_ids),
            "add_bos": self.add_bos,
        }
        (folder / "chat.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> ChatTokenizer:
        meta = json.loads((folder / "chat.json").read_text())
        return cls(
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
            chat_template=meta["chat_template"],
            bos_token=meta["bos_token"],
            eos_token=meta["eos_token"],
            eos_id=meta["eos_id"],
            stop_ids=frozenset(meta["stop_ids"]),
            add_bos=meta["add_bos"],
        )

    # --- text <-> ids ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings in it (e.g. `<|im_end|>`) become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def byte_level(self) -> bool:
        """Whether decoding is byte-level (GPT-2 style BPE): the text of ids is their bytes,
        concatenated, read as UTF-8. Then decode(a + b) == decode(a) + decode(b) whenever
        decode(b) is clean UTF-8 (no U+FFFD), since b starts on a character boundary."""
        return isinstance(self.tokenizer.decoder, decoders.ByteLevel)

    def token_text(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    # --- chat template --------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The chat template applied to `messages` (dicts with 'role' and 'content')."""
        try:
            return _compiled(self.chat_template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
                documents=None,
            )
        except TokenizerError:
            raise
        except Exception as exc:  # jinja2 errors of a template we did not write
            raise TokenizerError(f"chat template failed: {exc}") from exc


class IncrementalDecoder:
    """Turns generated ids into text deltas, holding back bytes of an unfinished character.

    Decodes a short window of ids (from `_prefix`) and emits what the newest ids added to it;
    a window that ends in U+FFFD is an incomplete UTF-8 sequence and waits for more ids.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special=True)
        text = self._tok.decode(self._ids[self._prefix :], skip_special=True)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self._ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (possibly ending in U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special=True)
        text = self._tok.decode(self._ids[self._prefix :], skip_special=True)
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_TEMPLATES: dict[str, Any] = {}


def _compiled(source: str) -> Any:
    template = _TEMPLATES.get(source)
    if template is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        template = _TEMPLATES[source] = env.from_string(source)
    return template
