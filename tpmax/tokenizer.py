"""Tokenizers and chat templates: a `Tokenizer` built from a Hugging Face directory or from GGUF
metadata (over the `tokenizers` library), the one place EOS ids and GGUF metadata are decoded,
chat-template rendering in a jinja2 sandbox with limits on time and output size, and a
`StreamDecoder` that turns generated ids into text piece by piece. Every problem with the files
raises `LoadError` (or its `ChatTemplateError`), naming the file."""

from __future__ import annotations

import contextvars
import json
import os
import re
import string
import time
import types
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, update_wrapper
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from .errors import ChatTemplateError, LoadError
from .files import MAX_JSON_BYTES, regular_file

CHAT_TEMPLATE_SECONDS = 2.0  # default limits of one chat-template rendering
CHAT_TEMPLATE_MAX_CHARS = 1_000_000

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
    chat_template_source: str = "chat template"  # where the template came from, for errors

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer directory; the one place its EOS ids are resolved.

        Args:
          path: directory with `tokenizer.json` (required) and optionally `tokenizer_config.json`,
            `chat_template.jinja` (wins over the config's template), `generation_config.json`
            and `config.json` (EOS ids, see `hf_eos_token_ids`).
        Returns:
          the Tokenizer. Raises LoadError naming the file that is missing or malformed.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise LoadError(f"{tokenizer_file}: not found (a Hugging Face tokenizer needs it)")
        text = _read_text(tokenizer_file, MAX_JSON_BYTES)
        _parse_json(tokenizer_file, text)  # a clear error for bad JSON before tokenizers sees it
        backend = _build(lambda: _Backend.from_str(text), f"{tokenizer_file}: not a valid tokenizers file")
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file)
        generation = _read_json(path / "generation_config.json")

        bos_token = _token_text(config.get("bos_token"), "bos_token", config_file)
        eos_token = _token_text(config.get("eos_token"), "eos_token", config_file)
        bos_id = _token_id(backend, bos_token, "bos_token", config_file)
        gen_bos = generation.get("bos_token_id")
        if bos_id is None and gen_bos is not None:
            bos_id = next(iter(_ids(gen_bos, "bos_token_id", path / "generation_config.json")), None)
        eos_ids = _resolve_eos(path, _token_id(backend, eos_token, "eos_token", config_file), generation)

        # BOS is added when the config says so; without a flag, when tokenizer.json's own
        # post-processor adds it.
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, (bool, type(None))):
            raise LoadError(f"{config_file}: add_bos_token must be true or false, got {add_bos!r:.80}")
        if add_bos is None:
            add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template, source = _read_text(template_file, MAX_JSON_BYTES), str(template_file)
        else:
            template = _pick_template(config.get("chat_template"), config_file)
            source = f"{config_file} chat_template"
        return cls(
            backend=backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos_token=bool(add_bos),
            chat_template=template,
            bos_token=bos_token,
            eos_token=eos_token,
            template_vars=_named_tokens(config, ("unk_token", "pad_token"), config_file),
            chat_template_source=source,
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, object] | Any, *, source: str | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata.

        Args:
          metadata: the file's metadata as `gguf_metadata` returns it; or, for compatibility, a
            `gguf.GGUFReader` or the path of a .gguf file (decoded here with `gguf_metadata`).
          source: the file's name, for error messages (taken from the reader or path if None).
        Returns:
          the Tokenizer. Raises LoadError for tokenizer kinds other than byte-level BPE
          (`tokenizer.ggml.model == "gpt2"`), unknown `tokenizer.ggml.pre` values, and metadata
          that is missing, of the wrong type, or inconsistent (merges of unknown tokens, ...).
        """
        if isinstance(metadata, (str, os.PathLike)):
            import gguf

            source = source or str(metadata)
            try:
                metadata = gguf.GGUFReader(metadata)
            except Exception as err:  # bad magic, truncated file, unknown value type, ...
                raise LoadError(f"{source}: not a valid GGUF file ({type(err).__name__}: {err})") from None
        if not isinstance(metadata, Mapping):
            source = source or _reader_name(metadata)
            metadata = gguf_metadata(metadata, source=source)
        source = source or "GGUF file"
        meta = _GGUFKeys(metadata, source)

        kind = meta.get("tokenizer.ggml.model", str)
        if kind != "gpt2":
            raise LoadError(
                f"{source}: GGUF tokenizer.ggml.model = {kind!r} is not supported; tpmax reads "
                f"byte-level BPE ('gpt2') tokenizers only"
            )
        pre = meta.get("tokenizer.ggml.pre", str) or "gpt2"
        if pre not in GGUF_PRE_TOKENIZERS:
            raise LoadError(
                f"{source}: GGUF tokenizer.ggml.pre = {pre!r} is not supported; known: "
                f"{sorted(GGUF_PRE_TOKENIZERS)}"
            )
        spec = GGUF_PRE_TOKENIZERS[pre]
        tokens: list[str] = meta.get("tokenizer.ggml.tokens", list, str)
        merges: list[str] = meta.get("tokenizer.ggml.merges", list, str)
        if not tokens or merges is None:
            raise LoadError(f"{source}: GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
        types_ = meta.get("tokenizer.ggml.token_type", list, int) or [1] * len(tokens)
        if len(types_) != len(tokens):
            raise LoadError(
                f"{source}: GGUF tokenizer.ggml.token_type has {len(types_)} entries for "
                f"{len(tokens)} tokens"
            )
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = _gguf_merges(merges, vocab, source)

        bpe = _build(
            lambda: models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges),
            f"{source}: GGUF tokenizer rejected by the tokenizers library",
        )
        backend = _Backend(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) are matched whole and are special; user-defined
        # tokens are matched whole but are ordinary text.
        special = [t for t, k in zip(tokens, types_) if k == _GGUF_CONTROL]
        user = [t for t, k in zip(tokens, types_) if k == _GGUF_USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        def token_id(key: str) -> int | None:
            """The id `key` names; an id outside the vocabulary is an error for BOS / EOS and
            ignored for the others (files in the wild carry stray pad ids)."""
            i = meta.get(f"tokenizer.ggml.{key}", int)
            if i is None or 0 <= i < len(tokens):
                return i
            if key in ("bos_token_id", "eos_token_id"):
                raise LoadError(
                    f"{source}: GGUF tokenizer.ggml.{key} = {i} is outside the vocabulary ({len(tokens)} tokens)"
                )
            return None

        def text_of(key: str) -> str | None:
            i = token_id(key)
            return None if i is None else tokens[i]

        eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")  # end of text/turn/message
        add_bos = meta.get("tokenizer.ggml.add_bos_token", (bool, int))
        return cls(
            backend=backend,
            bos_token_id=token_id("bos_token_id"),
            eos_token_ids=_unique_ints(token_id(k) for k in eos_keys),
            add_bos_token=bool(add_bos or False),
            chat_template=meta.get("tokenizer.chat_template", str),
            bos_token=text_of("bos_token_id"),
            eos_token=text_of("eos_token_id"),
            template_vars={
                name: text
                for name, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
                if (text := text_of(key)) is not None
            },
            chat_template_source=f"{source}: GGUF metadata tokenizer.chat_template",
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
        if len(self.chat_template) > _MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"{self.chat_template_source}: {len(self.chat_template)} characters, more than the "
                f"limit of {_MAX_TEMPLATE_CHARS} for a chat template"
            )
        try:
            return _template_environment().from_string(self.chat_template)
        except Exception as err:  # TemplateSyntaxError, or a refused constant at compile time
            raise ChatTemplateError(f"{self.chat_template_source}: {_reason(err)}") from None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        max_seconds: float = CHAT_TEMPLATE_SECONDS,
        max_chars: int = CHAT_TEMPLATE_MAX_CHARS,
        **template_vars: Any,
    ) -> str:
        """Render a conversation with the model's chat template, as Hugging Face does.

        Args:
          messages: `[{"role": "user", "content": "..."}, ...]`.
          add_generation_prompt: end with the header that starts the assistant's turn.
          max_seconds: wall-clock limit of the rendering.
          max_chars: limit on the prompt's length and on every value the template builds.
          **template_vars: extra template variables (`tools=[...]`, ...).
        Returns:
          the prompt text; encode it with `encode` (BOS is not doubled). Raises ChatTemplateError
          (naming the template's source) when the template does not compile, raises an error
          itself (`raise_exception`), does something the sandbox refuses, or passes a limit.
        """
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template")
        return _render_chat_template(
            self._compiled_template,
            dict(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **{**self.template_vars, **template_vars},
            ),
            source=self.chat_template_source,
            max_seconds=max_seconds,
            max_chars=max_chars,
        )


# ---------------------------------------------------------------------------------------------
# GGUF metadata and Hugging Face EOS ids: decoded / resolved once, here
# ---------------------------------------------------------------------------------------------


def gguf_metadata(reader: Any, *, source: str | None = None) -> dict[str, object]:
    """Every metadata field of a GGUF file as plain Python values.

    Args:
      reader: a `gguf.GGUFReader`.
      source: the file's name for error messages (default: the file the reader maps).
    Returns:
      `{key: value}`: str, int, float or bool for scalars, a list of those for arrays (the
      token list and merges included). Raises LoadError naming the key for a field that
      cannot be decoded (a string that is not UTF-8, a nested array, a value of no type).
    """
    source = source or _reader_name(reader)
    meta: dict[str, object] = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = _decode_gguf_field(f)
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as err:
            raise LoadError(f"{source}: GGUF metadata {key} cannot be decoded: {err}") from None
    return meta


def hf_eos_token_ids(directory: str | os.PathLike) -> tuple[int, ...]:
    """The EOS ids of a Hugging Face model directory, resolved as `Tokenizer.from_hf_dir` does.

    Args:
      directory: the model directory. With a `tokenizer.json` this is
        `Tokenizer.from_hf_dir(directory).eos_token_ids`; without one, the text of
        `tokenizer_config.json`'s eos_token is looked up in its `added_tokens_decoder`.
    Returns:
      the ids, in order: tokenizer_config.json's eos_token, then generation_config.json's
      eos_token_id (an int or a list); config.json's eos_token_id only if those give none.
      Raises LoadError naming a malformed file.
    """
    path = Path(directory)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_hf_dir(path).eos_token_ids
    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file)
    eos_text = _token_text(config.get("eos_token"), "eos_token", config_file)
    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise LoadError(f"{config_file}: added_tokens_decoder must be an object, got {type(added).__name__}")
    eos_id = None
    for key, token in added.items():
        if isinstance(token, dict) and token.get("content") == eos_text and key.isdigit():
            eos_id = int(key)
    return _resolve_eos(path, eos_id, _read_json(path / "generation_config.json"))


def _resolve_eos(path: Path, tokenizer_eos: int | None, generation: Mapping[str, Any]) -> tuple[int, ...]:
    """tokenizer_config's EOS id, then generation_config's; config.json's as the last fallback."""
    ids = [] if tokenizer_eos is None else [tokenizer_eos]
    if generation.get("eos_token_id") is not None:
        ids += _ids(generation["eos_token_id"], "eos_token_id", path / "generation_config.json")
    if not ids:
        config = _read_json(path / "config.json")
        if config.get("eos_token_id") is not None:
            ids += _ids(config["eos_token_id"], "eos_token_id", path / "config.json")
    return _unique_ints(ids)


def _ids(value: Any, name: str, source: Path) -> tuple[int, ...]:
    """A token id or list of ids from a JSON config; LoadError for anything else."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise LoadError(f"{source}: {name} must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _reader_name(reader: Any) -> str:
    return str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF file")


def _decode_gguf_field(f: Any) -> object:
    """One `gguf.ReaderField` as Python; ValueError / UnicodeDecodeError when it cannot be."""
    import numpy as np
    from gguf import GGUFValueType

    kinds = list(f.types)
    if not kinds:
        raise ValueError("the field has no value type")
    if kinds[0] != GGUFValueType.ARRAY:
        part = f.parts[f.data[0]]
        return _gguf_string(part) if kinds[0] == GGUFValueType.STRING else part.tolist()[0]
    if len(kinds) == 1:
        return []  # an empty array (its element type is not recorded)
    if len(kinds) > 2:
        raise ValueError("nested arrays are not supported")
    if kinds[1] == GGUFValueType.STRING:
        out = []
        for n, i in enumerate(f.data):
            try:
                out.append(_gguf_string(f.parts[i]))
            except UnicodeDecodeError as err:
                raise ValueError(f"element {n} is not UTF-8 ({err.reason} at byte {err.start})") from None
        return out
    return np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []


def _gguf_string(part: Any) -> str:
    return part.tobytes().decode("utf-8")


class _GGUFKeys:
    """Typed access to decoded GGUF metadata: LoadError naming the key for a wrong type."""

    def __init__(self, meta: Mapping[str, object], source: str):
        self.meta, self.source = meta, source

    def get(self, key: str, kind: type | tuple[type, ...], item: type | None = None) -> Any:
        """`meta[key]` (None if absent), checked to be a `kind` (of `item`s for a list)."""
        value = self.meta.get(key)
        if value is None:
            return None
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and item is not None:
            ok = all(isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value)
        if not ok:
            want = f"a list of {item.__name__}" if item else getattr(kind, "__name__", str(kind))
            raise LoadError(f"{self.source}: GGUF {key} should be {want}, got {_describe(value)}")
        return value


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value[:1000]})
        return f"a list of {'/'.join(kinds) or 'nothing'}"
    return f"{type(value).__name__} {value!r:.80}"


def _gguf_merges(merges: Sequence[str], vocab: Mapping[str, int], source: str) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` as pairs, each side and the merged token in the vocabulary."""
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not (sep and left and right):
            raise LoadError(f"{source}: GGUF tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens split by a space")
        for token in (left, right, left + right):
            if token not in vocab:
                raise LoadError(
                    f"{source}: GGUF tokenizer.ggml.merges[{i}] = {merge!r} names {token!r}, which "
                    f"is not in tokenizer.ggml.tokens"
                )
        pairs.append((left, right))
    return pairs


# ---------------------------------------------------------------------------------------------
# Chat templates: a jinja2 sandbox with limits
#
# Templates come with model files, so they are untrusted code. The sandbox already refuses
# private attributes and mutation; on top of it, one rendering gets a deadline and a size limit
# L (`max_chars`):
#   - time: every `{% for %}` item, call (macros, `loop()`, methods) and filter checks the deadline,
#     so no loop or recursion runs past it (templates have no other way to repeat work);
#   - size: no operation may build a value whose rendered size passes L. The checks come before
#     the work for everything that can multiply a size in one step (`*`, `**`, `+`, `%`,
#     `str.format` widths, padding, `replace`, `join`, `indent`, `tojson(indent=...)`, ...), and
#     list/tuple/dict literals, `~` concatenation, call arguments and results, filter arguments
#     and results and every `{{ ... }}` are measured against L; the output stops at L.
# Every failure surfaces as one ChatTemplateError naming the template's source.
# ---------------------------------------------------------------------------------------------


class _TemplateLimit(Exception):
    """A limit of the rendering was hit; the message says which."""


@dataclass
class _Budget:
    """The limits of one rendering (one per render call, found through `_BUDGET`)."""

    deadline: float  # time.monotonic() value
    max_chars: int
    max_seconds: float
    emitted: int = 0  # characters of all {{ ... }} values so far, in macros and blocks too

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"rendering took longer than {self.max_seconds:g} s")

    def check(self, value: Any, what: str) -> Any:
        """`value`, after checking that rendering it would stay within the size limit."""
        if _size(value, self) > self.max_chars:
            raise _TemplateLimit(f"{what} is larger than the limit of {self.max_chars} characters")
        return value

    def check_bound(self, bound: int, what: str) -> None:
        if bound > self.max_chars:
            raise _TemplateLimit(
                f"{what} would make about {bound} characters, more than the limit of {self.max_chars}"
            )


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("tpmax_chat_template_budget")
_MAX_INT_BITS = 1 << 16  # integers the template computes stay below 2**65536
_MAX_LIST_SUM = 10_000  # `sum` over lists copies quadratically; at most this many items
_MAX_WRAP_WORK = 10**9  # bytes textwrap may copy to break one long word
_EMIT_FACTOR = 8  # macro and block output is emitted again by its caller: allow L * this in all
_MAX_TEMPLATE_CHARS = 1 << 20  # longer chat templates are refused before compiling


def _budget() -> _Budget:
    budget = _BUDGET.get(None)
    if budget is None:  # rendered outside _render_chat_template (e.g. a test): default limits
        return _Budget(time.monotonic() + CHAT_TEMPLATE_SECONDS, CHAT_TEMPLATE_MAX_CHARS, CHAT_TEMPLATE_SECONDS)
    return budget


def _rendered_size(value: Any, limit: int, *, indent: int = 0) -> int:
    """About how many characters `str(value)` / JSON of `value` takes; stops counting past `limit`.

    Containers are walked and counted in full (a list holding the same list twice counts it
    twice), each distinct container once per depth, so a deep tower of shared lists costs its
    height, not its expanded size. `indent` adds that many characters per nesting level to
    every element (for `tojson(indent=...)` / `pprint`).
    """
    memo: dict[tuple[int, int], int] = {}  # (id, depth) -> size of a finished container
    open_ids: set[int] = set()  # containers being walked (a namespace may hold itself)
    work: list[list] = []  # [container, depth, its children iterator, size so far]

    def leaf(v: Any, depth: int) -> int | None:
        own = 2 + indent * depth
        if isinstance(v, (str, bytes, bytearray)):
            return own + len(v)
        if isinstance(v, int):
            return own + v.bit_length() // 3 + 1
        if (id(v), depth) in memo:
            return memo[id(v), depth]
        if id(v) in open_ids or not isinstance(v, (Mapping, list, tuple, set, frozenset, Namespace)):
            return own + 24  # numbers, undefined, macros, loop objects: short reprs
        return None

    def children(v: Any) -> tuple[Iterator, int]:
        if isinstance(v, Namespace):
            v = v._Namespace__attrs
        if isinstance(v, Mapping):
            return (x for kv in v.items() for x in kv), 2 * len(v)
        return iter(v), len(v)

    def push(v: Any, depth: int) -> int | None:
        """Start walking `v`, or return its size at once."""
        size = leaf(v, depth)
        if size is None:
            items, extra = children(v)
            work.append([v, depth, items, 2 + indent * depth + extra])
            open_ids.add(id(v))
        return size

    total = push(value, 0)
    while work and total is None:
        top = work[-1]
        child = next(top[2], _END)
        size = None if child is _END else push(child, top[1] + 1)
        if child is _END:
            work.pop()
            open_ids.discard(id(top[0]))
            memo[id(top[0]), top[1]] = size = top[3]
            if not work:
                total = size
                break
        if size is not None:
            work[-1][3] += size
            if work[-1][3] > limit:
                return work[-1][3]
    return total


_END = object()


def _size(value: Any, budget: _Budget) -> int:
    """The length of a string, else `_rendered_size` (which counts quotes and brackets)."""
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value)
    if kind is int:
        return value.bit_length() // 3 + 1
    if kind is float or kind is bool or value is None:
        return 24
    return _rendered_size(value, budget.max_chars)


def _materialize(value: Any, budget: _Budget) -> Any:
    """A one-shot iterator (a `map` or `select` result) as a list, counted against the limit."""
    if not isinstance(value, Iterator):
        return value
    out, total = [], 0
    for item in value:
        out.append(item)
        total += 2 + _size(item, budget)
        budget.check_bound(total, "the items of an iterator")
        budget.tick()
    return out


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def _percent_bound(fmt: str, args: Any, budget: _Budget) -> int:
    """Upper bound of `fmt % args`; refuses `*` widths and widths past the limit."""
    specs = widths = 0
    for width, precision, conv in _PERCENT_SPEC.findall(fmt):
        if conv == "%":
            continue
        if "*" in (width, precision):
            raise _TemplateLimit("'%' formatting with a '*' width is not allowed in chat templates")
        for n in (width, precision):
            budget.check_bound(int(n or 0), "a '%' format width")
        specs += 1
        widths += int(width or 0) + int(precision or 0)
    return len(fmt) + widths + specs * _size(args, budget)


def _format_bound(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any], budget: _Budget) -> int:
    """Upper bound of `fmt.format(*args, **kwargs)`; refuses nested specs and huge widths."""
    fields, widths = 0, 0
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise _TemplateLimit("nested format specs are not allowed in chat templates")
        for n in re.findall(r"\d+", spec or ""):
            budget.check_bound(int(n), "a str.format width")
            widths += int(n)
    return len(fmt) + widths + fields * (_size(list(args), budget) + _size(dict(kwargs), budget))


def _replace_bound(s: Any, old: Any, new: Any, count: Any) -> int:
    """Upper bound of the length of `s.replace(old, new, count)` (0 for arguments it rejects)."""
    if not (isinstance(s, (str, bytes)) and type(old) is type(s) and type(new) is type(s)):
        return 0
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _str_method_bound(method: Any, args: tuple, kwargs: dict, budget: _Budget) -> int | None:
    """Upper bound of a str/bytes method's result where it can multiply sizes; None if it cannot."""
    s, name = method.__self__, method.__name__
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    if name == "replace":
        return _replace_bound(s, arg(0, "old"), arg(1, "new"), arg(2, "count", -1))
    if name == "join":
        items = arg(0, "iterable", ())
        return _size(items, budget) + len(items) * len(s) if isinstance(items, Sized) else None
    if name == "expandtabs":
        return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * int(arg(0, "tabsize", 8))
    if name == "translate":
        table = arg(0, "table", None)
        longest = max((_size(v, budget) for v in table.values()), default=1) if isinstance(table, Mapping) else 1
        return len(s) * max(1, longest)
    return None


def _filter_bound(name: str, value: Any, args: tuple, kwargs: dict, budget: _Budget) -> int | None:
    """Upper bound of the size of filter `name`'s result, for the filters that multiply sizes."""
    arg = lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default)  # noqa: E731
    text = lambda v: len(v) if isinstance(v, str) else _size(v, budget)  # noqa: E731
    if name == "center":
        return text(value) + _int_arg(arg(0, "width", 80))
    if name == "indent":
        width = arg(0, "width", 4)
        per_line = len(width) if isinstance(width, str) else _int_arg(width)
        return text(value) + (str(value).count("\n") + 1) * per_line
    if name == "wordwrap":
        wrap, width = str(arg(2, "wrapstring", None) or "\n"), _int_arg(arg(0, "width", 79))
        s = str(value)
        longest = max(map(len, s.split()), default=0)
        if longest * longest // max(width, 1) > _MAX_WRAP_WORK:  # textwrap cuts long words in O(n^2)
            raise _TemplateLimit(f"wordwrap of a {longest}-character word to width {width} is too slow")
        lines = len(s.split()) + s.count("\n") + len(s) // max(width, 1) + 1
        return len(s) + lines * len(wrap)
    if name == "join":
        sep = arg(0, "d", "")
        return _size(value, budget) + (len(value) if isinstance(value, Sized) else 0) * text(sep)
    if name == "replace":
        return _replace_bound(str(value), str(arg(0, "old")), str(arg(1, "new")), arg(2, "count", None))
    if name == "format":
        return _percent_bound(str(value), [*args, kwargs], budget)
    if name == "tojson":
        indent = arg(1, "indent", None)
        per_level = len(indent) if isinstance(indent, str) else _int_arg(indent or 0)
        budget.check_bound(per_level, "a tojson indent")
        return _rendered_size(value, budget.max_chars, indent=per_level)
    if name == "pprint":
        return _rendered_size(value, budget.max_chars, indent=2)
    if name in ("batch", "slice"):
        count = _int_arg(arg(0, "linecount" if name == "batch" else "slices", 1))
        return _size(value, budget) + count * (2 + _size(arg(1, "fill_with", None), budget))
    if name == "sum":
        items = value if isinstance(value, Sized) else ()
        start = arg(1, "start", 0)
        if not isinstance(start, (int, float)) and len(items) > _MAX_LIST_SUM:
            raise _TemplateLimit(f"sum over more than {_MAX_LIST_SUM} non-numbers")
        return _size(value, budget) + _size(start, budget)
    return None


def _int_arg(value: Any) -> int:
    return abs(value) if isinstance(value, int) else 0


def _guard_filter(name: str, func: Callable, *, is_test: bool = False) -> Callable:
    """`func` (a jinja2 filter or test) with its arguments, its result's size and time checked."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # environment / context passed first

    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        head, value, rest = args[:skip], args[skip], args[skip + 1 :]
        if not is_test:  # a test must not consume an iterator the template uses afterwards
            value = _materialize(value, budget)
        what = f"the input of |{name}" if not is_test else f"the input of the test {name!r}"
        for v in (value, *rest, *kwargs.values()):
            budget.check(v, what)
        if not is_test:
            bound = _filter_bound(name, value, rest, kwargs, budget)
            if bound is not None:
                budget.check_bound(bound, f"|{name}")
        result = func(*head, value, *rest, **kwargs)
        return result if is_test else budget.check(result, f"the result of |{name}")

    return update_wrapper(guarded, func)


_BINOP = {"*": lambda a, b: a * b, "**": lambda a, b: a**b, "+": lambda a, b: a + b, "%": lambda a, b: a % b}


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every size-multiplying step checked against `_Budget`."""

    intercepted_binops = frozenset(_BINOP)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        seq = (str, bytes, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, seq):
            left, right = right, left
        if operator == "*" and isinstance(left, seq) and isinstance(right, int):
            budget.check_bound(_size(left, budget) * max(right, 0), "'*' repetition")
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _TemplateLimit(f"'*' of integers past {_MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and (left.bit_length() - 1) * right > _MAX_INT_BITS:
                raise _TemplateLimit(f"'**' of integers past {_MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
            budget.check_bound(_size(left, budget) + _size(right, budget), "'+'")
        elif operator == "%" and isinstance(left, (str, bytes)):
            fmt = left if isinstance(left, str) else left.decode("latin-1")
            budget.check_bound(_percent_bound(fmt, right, budget), "'%' formatting")
        return _BINOP[operator](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        budget.tick()
        name = getattr(__obj, "__name__", type(__obj).__name__)
        for v in (*args, *kwargs.values()):
            budget.check(v, f"an argument of {name}()")
        wrapped = getattr(__obj, "__wrapped__", None)  # the sandbox's str.format / format_map
        if isinstance(getattr(wrapped, "__self__", None), str) and name in ("format", "format_map"):
            mapping = args[0] if name == "format_map" and args else kwargs
            positional = () if name == "format_map" else args
            budget.check_bound(_format_bound(wrapped.__self__, positional, mapping, budget), "str.format")
        elif isinstance(__obj, (types.BuiltinMethodType, types.MethodWrapperType)):
            args = tuple(_materialize(a, budget) for a in args)
            for v in (*args, *kwargs.values()):
                if isinstance(v, int) and abs(v) > budget.max_chars:
                    raise _TemplateLimit(f"{name}() with the argument {v} (limit {budget.max_chars})")
            if isinstance(getattr(__obj, "__self__", None), (str, bytes)):
                bound = _str_method_bound(__obj, args, kwargs, budget)
                if bound is not None:
                    budget.check_bound(bound, f"{name}()")
        result = super().call(__context, __obj, *args, **kwargs)
        return budget.check(result, f"the result of {name}()")


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles list/tuple/dict literals and `~` to calls that check their size first, and the
    iterable of every `{% for %}` to one that checks the deadline at each item."""

    def visit_Template(self, node: Any, frame: Any = None) -> None:
        for loop in node.find_all(nodes.For):  # before the filters in use are collected
            if not (isinstance(loop.iter, nodes.Filter) and loop.iter.name == _CHECKED_ITER):
                loop.iter = nodes.Filter(loop.iter, _CHECKED_ITER, [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)

    def _checked(self, visit: Callable, node: Any, frame: Any) -> None:
        self.write("environment.checked_literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: Any, frame: Any) -> None:
        self._checked(super().visit_List, node, frame)

    def visit_Dict(self, node: Any, frame: Any) -> None:
        self._checked(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: Any, frame: Any) -> None:
        if node.ctx != "load":  # an assignment target: `{% for a, b in ... %}`
            super().visit_Tuple(node, frame)
        else:
            self._checked(super().visit_Tuple, node, frame)

    def visit_Concat(self, node: Any, frame: Any) -> None:
        if frame.eval_ctx.volatile:  # the join jinja2 would use, as in CodeGenerator.visit_Concat
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {join})")


_CHECKED_ITER = "tpmax_checked_iter"  # the filter every loop's iterable goes through


def _checked_iter(iterable: Iterable) -> Iterator:
    """The items of a `{% for %}` loop, the deadline checked before each."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _checked_literal(value: Any) -> Any:
    return _budget().check(value, "a list, tuple or dict")


def _checked_concat(values: tuple, join: Callable[[tuple], str]) -> str:
    budget = _budget()
    budget.check_bound(sum(_size(v, budget) for v in values), "'~' concatenation")
    return join(values)


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` value, before it becomes text: at most L alone, 8 L all together."""
    budget = _budget()
    size = _size(value, budget)
    budget.check_bound(size, "a {{ ... }} value")
    budget.emitted += size
    if budget.emitted > _EMIT_FACTOR * budget.max_chars:
        raise _TemplateLimit(
            f"the {{{{ ... }}}} values (in macros and blocks too) add up to more than "
            f"{_EMIT_FACTOR} x {budget.max_chars} characters"
        )
    return value


def _template_environment() -> _LimitedSandbox:
    """The sandbox chat templates are compiled in (Hugging Face's settings, limits added)."""
    env = _LimitedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        finalize=_finalize,
        optimized=False,  # no constant folding: every filter runs at render time, under limits
    )
    env.code_generator_class = _GuardedCodeGenerator
    env.checked_literal = _checked_literal
    env.checked_concat = _checked_concat
    env.filters["tojson"] = _tojson
    for name in ("urlize",):  # unbounded output, never used by chat templates
        env.filters.pop(name, None)
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _guard_filter(name, f, is_test=True) for name, f in env.tests.items()}
    env.filters[_CHECKED_ITER] = _checked_iter
    env.globals.pop("lipsum", None)  # random text of any length
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _render_chat_template(
    template: jinja2.Template,
    variables: Mapping[str, Any],
    *,
    source: str,
    max_seconds: float = CHAT_TEMPLATE_SECONDS,
    max_chars: int = CHAT_TEMPLATE_MAX_CHARS,
) -> str:
    """Render a template compiled by `_template_environment` within the limits (the body of
    `Tokenizer.apply_chat_template`).

    Args:
      template: the compiled template.
      variables: its variables (`messages`, `bos_token`, ...).
      source: where the template came from, for the error message.
      max_seconds: wall-clock limit.
      max_chars: limit on the output's length and on every value the template builds.
    Returns:
      the rendered text. Raises ChatTemplateError for anything that goes wrong.
    """
    budget = _Budget(time.monotonic() + max_seconds, max_chars, max_seconds)
    token = _BUDGET.set(budget)
    try:
        pieces, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            if n > max_chars:
                raise _TemplateLimit(f"the output is longer than the limit of {max_chars} characters")
            budget.tick()
            pieces.append(piece)
        return "".join(pieces)
    except Exception as err:  # the template is untrusted code: any failure is the template's
        raise ChatTemplateError(f"{source}: {_reason(err)}") from None
    finally:
        _BUDGET.reset(token)


def _reason(err: BaseException) -> str:
    if isinstance(err, _TemplateLimit):
        return f"limit exceeded: {err}"
    if isinstance(err, _TemplateRaised):
        return f"the template raised an error: {err}"
    if isinstance(err, jinja2.TemplateSyntaxError):
        return f"syntax error on line {err.lineno}: {err.message}"
    if isinstance(err, jinja2.exceptions.SecurityError):
        return f"refused by the sandbox: {err}"
    return f"{type(err).__name__}: {err}"


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What a template's `raise_exception(message)` raises."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise _TemplateLimit("strftime_now takes a format string of at most 256 characters")
    return datetime.now().strftime(fmt)


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


def _build(make: Callable[[], Any], failure: str) -> Any:
    """`make()`, a call into the tokenizers library; its errors become LoadError(failure: ...)."""
    try:
        return make()
    except Exception as err:  # parse errors, out-of-vocabulary merges, ...
        raise LoadError(f"{failure}: {err}") from None
    except BaseException as err:  # a Rust panic arrives as pyo3's PanicException, no Exception
        if type(err).__name__ != "PanicException":
            raise
        raise LoadError(f"{failure}: {err}") from None


def _read_text(path: Path, max_bytes: int) -> str:
    """The UTF-8 text of `path` (a BOM is dropped); LoadError if it is not a regular file, is
    unreadable, too large or not UTF-8."""
    regular_file(path)  # never opens a FIFO or a device
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise LoadError(f"{path}: cannot read it: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise LoadError(f"{path}: larger than {max_bytes} bytes, refusing to read it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoadError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise LoadError(f"{path}: invalid JSON: {err}") from None


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} if the (optional) file does not exist."""
    if not path.exists():
        return {}
    value = _parse_json(path, _read_text(path, MAX_JSON_BYTES))
    if not isinstance(value, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any, name: str, source: Path) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise LoadError(f"{source}: {name} must be a string or {{\"content\": string}}, got {value!r:.80}")


def _named_tokens(config: Mapping, names: Sequence[str], source: Path) -> dict[str, str]:
    return {n: t for n in names if (t := _token_text(config.get(n), n, source)) is not None}


def _token_id(backend: _Backend, text: str | None, name: str, source: Path) -> int | None:
    if text is None:
        return None
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise LoadError(f"{source}: {name} {text!r} is not in the vocabulary of tokenizer.json")
    return token_id


def _pick_template(value: Any, source: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which we use 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise LoadError(f"{source}: chat_template list has no 'default' entry: {sorted(map(str, named))}")
        if not isinstance(named["default"], str):
            kind = type(named["default"]).__name__
            raise LoadError(f"{source}: chat_template 'default' must be a string, got {kind}")
        return named["default"]
    raise LoadError(f"{source}: chat_template must be a string or a list, got {type(value).__name__}")


def _unique_ints(values: Iterable[Any]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v not in out:
            out.append(v)
    return tuple(out)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like Hugging Face: no HTML escaping, unlike jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
