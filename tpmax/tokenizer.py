"""Tokenizers and chat templates: a `Tokenizer` built from a Hugging Face directory or from GGUF
metadata (over the `tokenizers` library), chat-template rendering in a jinja2 sandbox, and a
`StreamDecoder` that turns generated ids into text piece by piece."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# ---------------------------------------------------------------------------------------------
# GGUF pre-tokenizers: `tokenizer.ggml.pre` -> the split regexes llama.cpp applies, in order
# (each piece of one split is split again by the next), and whether a word that is already a
# whole vocabulary token skips the merges (llama.cpp's `ignore_merges`).
# ---------------------------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    splits: tuple[str, ...]  # regexes applied one after another, matches kept as pieces
    ignore_merges: bool = False


GGUF_PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt2": PreTokenizerSpec((_GPT2_SPLIT,)),
    "smollm": PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT)),  # single digits, then GPT-2
    "llama-bpe": PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True),
    "llama3": PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True),
    "qwen2": PreTokenizerSpec((_QWEN2_SPLIT,)),
}

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # `tokenizer.ggml.token_type` values


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Tokenizer:
    """A text <-> token-id mapping plus the special tokens and chat template a model needs.

    Build it with `Tokenizer.from_hf_dir` or `Tokenizer.from_gguf`; the fields are what those
    read from the files.
    """

    backend: _Backend
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # generation stops at any of these
    add_bos_token: bool  # `encode(..., add_special_tokens=True)` prepends BOS
    chat_template: str | None = None
    bos_token: str | None = None  # the text of the BOS / EOS tokens, as templates see them
    eos_token: str | None = None
    template_vars: Mapping[str, str] = field(default_factory=dict)  # extra names for templates

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer directory.

        Args:
          path: directory with `tokenizer.json` (required) and optionally `tokenizer_config.json`,
            `chat_template.jinja` (wins over the config's template) and `generation_config.json`.
        Returns:
          the Tokenizer. Raises ValueError naming the file that is missing or malformed.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{tokenizer_file}: not found (a Hugging Face tokenizer needs it)")
        text = tokenizer_file.read_text(encoding="utf-8")
        _read_json_text(tokenizer_file, text)  # a clear error for bad JSON before tokenizers sees it
        try:
            backend = _Backend.from_str(text)
        except Exception as err:
            raise ValueError(f"{tokenizer_file}: not a valid tokenizers file: {err}") from err
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        bos_token = _token_text(config.get("bos_token"))
        eos_token = _token_text(config.get("eos_token"))
        bos_id = _token_id(backend, bos_token, "bos_token", path / "tokenizer_config.json")
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        eos_ids = [_token_id(backend, eos_token, "eos_token", path / "tokenizer_config.json")]
        gen_eos = generation.get("eos_token_id")
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]

        # BOS is added when the config says so; without a flag, when tokenizer.json's own
        # post-processor adds it.
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"), path / "tokenizer_config.json")
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=_unique_ints(eos_ids),
            add_bos_token=bool(add_bos),
            chat_template=template,
            bos_token=bos_token,
            eos_token=eos_token,
            template_vars=_named_tokens(config, ("unk_token", "pad_token")),
        )

    @classmethod
    def from_gguf(cls, reader_or_path: Any) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata.

        Args:
          reader_or_path: a `gguf.GGUFReader` or the path of a .gguf file.
        Returns:
          the Tokenizer. Raises ValueError for tokenizer kinds other than byte-level BPE
          (`tokenizer.ggml.model == "gpt2"`) and for unknown `tokenizer.ggml.pre` values.
        """
        reader = reader_or_path
        if isinstance(reader_or_path, (str, os.PathLike)):
            import gguf

            reader = gguf.GGUFReader(reader_or_path)
        meta = lambda key: _gguf_value(reader, key)  # noqa: E731

        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model = {kind!r} is not supported; tpmax reads byte-level "
                f"BPE ('gpt2') tokenizers only"
            )
        pre = meta("tokenizer.ggml.pre") or "gpt2"
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"GGUF tokenizer.ggml.pre = {pre!r} is not supported; known: "
                f"{sorted(GGUF_PRE_TOKENIZERS)}"
            )
        spec = GGUF_PRE_TOKENIZERS[pre]
        tokens: list[str] = meta("tokenizer.ggml.tokens")
        merges: list[str] = meta("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)

        bpe = models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            ignore_merges=spec.ignore_merges,
        )
        backend = _Backend(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) are matched whole and are special; user-defined
        # tokens are matched whole but are ordinary text.
        special = [t for t, k in zip(tokens, types) if k == _GGUF_CONTROL]
        user = [t for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        def text_of(key: str) -> str | None:
            i = meta(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos_id = meta("tokenizer.ggml.bos_token_id")
        eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")  # end of text/turn/message
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=_unique_ints(meta(f"tokenizer.ggml.{k}") for k in eos_keys),
            add_bos_token=bool(meta("tokenizer.ggml.add_bos_token") or False),
            chat_template=meta("tokenizer.chat_template"),
            bos_token=text_of("tokenizer.ggml.bos_token_id"),
            eos_token=text_of("tokenizer.ggml.eos_token_id"),
            template_vars={
                name: text
                for name, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
                if (text := text_of(f"tokenizer.ggml.{key}")) is not None
            },
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={self.eos_token_ids}, add_bos_token={self.add_bos_token}, "
            f"has_chat_template={self.has_chat_template})"
        )

    # -- text <-> ids --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
          text: the text; special-token strings in it (`<|im_start|>`) become their ids.
          add_special_tokens: prepend BOS if the model adds one and `text` does not already
            start with it (a chat template may have written it).
        Returns:
          list of ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of token `ids`; invalid UTF-8 decodes to U+FFFD.

        Args:
          ids: token ids, each in [0, vocab_size).
          skip_special_tokens: drop control tokens such as `<|im_end|>`.
        Returns:
          the text. Raises ValueError for an id out of range.
        """
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocabulary size {n}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer over this tokenizer (see `StreamDecoder`)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Render a conversation with the model's chat template, as Hugging Face does.

        Args:
          messages: `[{"role": "user", "content": "..."}, ...]`.
          add_generation_prompt: end with the header that starts the assistant's turn.
          **template_vars: extra template variables (`tools=[...]`, ...).
        Returns:
          the prompt text; encode it with `encode` (BOS is not doubled).
        """
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template")
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **{**self.template_vars, **template_vars},
        )


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer: `push` ids one at a time, get back the text they complete.

    Text is held back while the decoded tail ends in U+FFFD (a UTF-8 character split across
    tokens), so no broken character is ever emitted; `"".join(pieces) + flush() ==
    tokenizer.decode(all_ids)`. Each step decodes only the ids since the last emitted piece plus
    the piece before it (for decoders whose output depends on the preceding token).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were emitted last time; they give context
        self._read = 0  # ids[:read] are emitted

    def _new_text(self) -> str:
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        done = decode(self._ids[self._prefix : self._read])
        return decode(self._ids[self._prefix :])[len(done) :]

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """Return whatever is held back (incomplete characters as U+FFFD) and reset the hold."""
        text = self._new_text()
        self._prefix, self._read = self._read, len(self._ids)
        return text


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _read_json_text(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} if the (optional) file does not exist."""
    if not path.is_file():
        return {}
    value = _read_json_text(path, path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_tokens(config: Mapping, names: Sequence[str]) -> dict[str, str]:
    return {n: t for n in names if (t := _token_text(config.get(n))) is not None}


def _token_id(backend: _Backend, text: str | None, name: str, source: Path) -> int | None:
    if text is None:
        return None
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{source}: {name} {text!r} is not in the vocabulary of tokenizer.json")
    return token_id


def _pick_template(value: Any, source: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which we use 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{source}: chat_template list has no 'default' entry: {sorted(named)}")
    raise ValueError(f"{source}: chat_template must be a string or a list, got {type(value).__name__}")


def _unique_ints(values: Iterable[Any]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v not in out:
            out.append(v)
    return tuple(out)


def _gguf_value(reader: Any, key: str) -> Any:
    """Metadata `key` of a GGUFReader as Python (str/int/bool/float or a list), None if absent."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return None
    kind = f.types[-1]  # the element type for arrays, the type itself for scalars
    if kind == GGUFValueType.STRING:
        values = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    else:
        values = [f.parts[i].tolist()[0] for i in f.data]
    return values if f.types[0] == GGUFValueType.ARRAY else values[0]


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like Hugging Face: no HTML escaping, unlike jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
