"""Tokenizers: a `Tokenizer` built from a Hugging Face directory or from GGUF metadata (over the
`tokenizers` library), the one place EOS ids, sampling defaults and GGUF metadata are decoded,
chat prompts encoded so that message text never becomes a special token, and a
`StreamDecoder` that turns generated ids into text piece by piece. Chat templates render in
`chat_template`'s sandbox. Every problem with the files raises `LoadError` (or its
`ChatTemplateError`), naming the file."""

from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from . import chat_template
from .chat_template import CHAT_TEMPLATE_MAX_CHARS, CHAT_TEMPLATE_SECONDS
from ..core.errors import ChatTemplateError, LoadError  # noqa: F401 (ChatTemplateError: re-exported)
from ..core.files import parse_json, read_json, read_text

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



@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling settings a model's files recommend; None where they say nothing.

    From `generation_config.json` (`do_sample: false` = greedy, temperature 0) or GGUF
    `general.sampling.temp` / `top_k` / `top_p`. temperature 0 = greedy; top_k 0 = off.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


def _generation_defaults(values: Mapping[str, Any], keys: tuple[str, str, str], where: str) -> GenerationDefaults:
    """`GenerationDefaults` from `values[key]` for the (temperature, top_k, top_p) `keys`, each
    checked; LoadError `{where}{key} ...` for a wrong type or range."""
    found = {}
    for name, key in zip(("temperature", "top_k", "top_p"), keys):
        v = values.get(key)
        if v is None:
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = {
            "temperature": number and v >= 0,
            "top_k": number and isinstance(v, int) and v >= 0,
            "top_p": number and 0 < v <= 1,
        }[name]
        if not ok:
            want = {"temperature": "a number >= 0", "top_k": "an integer >= 0", "top_p": "a number in (0, 1]"}[name]
            raise LoadError(f"{where}{key} must be {want}, got {v!r:.80}")
        found[name] = float(v) if name != "top_k" else v
    return GenerationDefaults(**found)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _encode(backend: _Backend, text: str):
    """`backend.encode(text)` without special tokens added, through `encode_batch`: unlike
    `encode`, it releases the GIL while it works, so a server's event loop keeps running
    (a 4 MB prompt: 4.4 s of a stalled loop with `encode`, 0.1 s with this)."""
    return backend.encode_batch([text], add_special_tokens=False)[0]


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
    generation_defaults: GenerationDefaults = GenerationDefaults()  # the model's sampling defaults

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
        text = read_text(tokenizer_file)
        parse_json(tokenizer_file, text)  # a clear error for bad JSON before tokenizers sees it
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

        generation_file = path / "generation_config.json"
        do_sample = generation.get("do_sample")
        if not isinstance(do_sample, (bool, type(None))):
            raise LoadError(f"{generation_file}: do_sample must be true or false, got {do_sample!r:.80}")
        keys = ("temperature", "top_k", "top_p")
        defaults = _generation_defaults(generation, keys, f"{generation_file}: ")
        if do_sample is False:  # greedy, whatever else the file says (as transformers does)
            defaults = GenerationDefaults(temperature=0.0)

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template, source = read_text(template_file), str(template_file)
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
            generation_defaults=defaults,
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
            generation_defaults=_generation_defaults(
                metadata, ("general.sampling.temp", "general.sampling.top_k", "general.sampling.top_p"), f"{source}: GGUF "
            ),
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
          text: the text; special-token strings in it (`<|im_start|>`) become their ids (for
            chat messages use `encode_chat`, which keeps them plain).
          add_special_tokens: prepend BOS if the model adds one and `text` does not already
            start with it (a chat template may have written it).
        Returns:
          list of ids. Raises ValueError for a lone surrogate (text that is not valid Unicode).
        """
        _check_unicode(text, "the text")
        return self._with_bos(_encode(self.backend, text).ids, add_special_tokens)

    def _with_bos(self, ids: list[int], add: bool) -> list[int]:
        bos = self.bos_token_id
        if add and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            return [bos, *ids]
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
    def _compiled_template(self) -> Any:
        return chat_template.compile_template(self.chat_template, source=self.chat_template_source)

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
          the prompt text. To get its ids use `encode_chat`, which keeps special-token text in
          messages plain. Raises ChatTemplateError (naming the template's source) when the
          template does not compile, raises an error itself (`raise_exception`), does something
          the sandbox refuses, or passes a limit; ValueError for a lone surrogate.
        """
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = chat_template.render(
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
        _check_unicode(text, "the chat prompt")
        return text

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the answer.

        Special tokens the template writes (`<|im_start|>`) become their ids; text that comes
        from the messages never does: `<|im_end|>` typed by a user is encoded as plain text
        (Hugging Face's `split_special_tokens` for message content), so a message cannot forge
        a turn. The ids equal `encode(apply_chat_template(...))` when no message contains
        special-token text.

        How: every special-token text in the messages' strings is replaced by a placeholder
        before rendering, put back after; the backend's encoding is kept except in the stretches
        between two template-written special tokens that hold such a text, which are encoded
        again with special-token matching off.

        Args:
          messages, add_generation_prompt, **kwargs: as for `apply_chat_template`.
        Returns:
          list of ids, BOS first if the model adds one. Raises as `apply_chat_template`.
        """
        (masked, variables), originals = _mask_special_text((messages, kwargs), self._special_pattern)
        rendered = self.apply_chat_template(masked, add_generation_prompt=add_generation_prompt, **variables)
        pieces, forged, pos, last = [], [], 0, 0  # forged: [start, end) of message special text
        for m in _PLACEHOLDER.finditer(rendered):
            if int(m[1]) >= len(originals):  # the template's own text, not a placeholder
                continue
            original = originals[int(m[1])]
            pieces += [rendered[last : m.start()], original]
            pos += m.start() - last
            if original != _MARK:
                forged.append((pos, pos + len(original)))
            pos += len(original)
            last = m.end()
        text = "".join([*pieces, rendered[last:]])
        ids = self._encode_keeping_plain(text, forged) if forged else _encode(self.backend, text).ids
        return self._with_bos(ids, True)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def _special_pattern(self) -> re.Pattern:
        """Matches every special-token text (longest first) and the placeholder mark."""
        texts = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        return re.compile("|".join(map(re.escape, sorted(texts | {_MARK}, key=len, reverse=True))))

    @cached_property
    def _plain_backend(self) -> _Backend:
        """A copy of the backend that reads special-token text as plain text."""
        plain = _Backend.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def _encode_keeping_plain(self, text: str, forged: list[tuple[int, int]]) -> list[int]:
        """Ids of `text`, where special tokens overlapping a `forged` span (sorted, disjoint)
        are plain text: each stretch between two other special tokens that holds one is
        encoded again without special-token matching."""
        starts = [a for a, _ in forged]

        def is_forged(start: int, end: int) -> bool:
            k = bisect.bisect_right(starts, start)
            return (k > 0 and forged[k - 1][1] > start) or (k < len(forged) and forged[k][0] < end)

        enc = _encode(self.backend, text)
        ids: list[int] = []
        stretch: list[int] = []
        dirty, begin = False, 0

        def close(end: int) -> None:
            ids.extend(_encode(self._plain_backend, text[begin:end]).ids if dirty else stretch)

        for i, (start, end) in zip(enc.ids, enc.offsets):
            if i in self._special_ids and not is_forged(start, end):
                close(start)
                ids.append(i)
                stretch, dirty, begin = [], False, end
            else:
                stretch.append(i)
                dirty = dirty or i in self._special_ids
        close(len(text))
        return ids

# ---------------------------------------------------------------------------------------------
# Chat messages: special-token text kept plain
# ---------------------------------------------------------------------------------------------

_MARK = "\ue000"  # private-use characters around a placeholder's number
_PLACEHOLDER = re.compile("\ue000([0-9]{1,9})\ue001")
_MAX_MESSAGE_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def _mask_special_text(value: Any, pattern: re.Pattern) -> tuple[Any, list[str]]:
    """A copy of `value` (messages: dicts, lists, strings) with every `pattern` match in its
    strings replaced by a placeholder `\ue000<k>\ue001`; returns it and the list of matches
    (`originals[k]`). The mark character itself is masked too, so no placeholder comes from
    the messages."""
    originals: list[str] = []

    def text(s: str) -> str:
        def placeholder(m: re.Match) -> str:
            originals.append(m[0])
            return f"\ue000{len(originals) - 1}\ue001"

        return pattern.sub(placeholder, s)

    def walk(v: Any, depth: int) -> Any:
        if depth > _MAX_MESSAGE_DEPTH:
            raise ValueError(f"chat messages nested deeper than {_MAX_MESSAGE_DEPTH} levels")
        if isinstance(v, str):
            return text(v)
        if isinstance(v, Mapping):
            return {walk(k, depth + 1): walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        return v

    return walk(value, 0), originals


def _check_unicode(text: str, what: str) -> None:
    """ValueError for a lone surrogate (a str that is not valid Unicode cannot be encoded)."""
    bad = _SURROGATE.search(text)
    if bad:
        raise ValueError(
            f"{what} contains a lone surrogate {bad[0]!r} at character {bad.start()}; send valid Unicode text"
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
    """One `gguf.ReaderField` as Python through `ReaderField.contents()`; ValueError /
    UnicodeDecodeError when it cannot be."""
    from gguf import GGUFValueType

    kinds = list(f.types)
    if not kinds:
        raise ValueError("the field has no value type")
    if len(kinds) > 2:
        raise ValueError("nested arrays are not supported")
    try:
        return f.contents()
    except UnicodeDecodeError:
        if kinds[0] != GGUFValueType.ARRAY:
            raise
    for n in range(len(f.data)):  # name the element that is not UTF-8
        try:
            f.contents(n)
        except UnicodeDecodeError as err:
            raise ValueError(f"element {n} is not UTF-8 ({err.reason} at byte {err.start})") from None
    raise AssertionError("unreachable: an element failed to decode above")


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
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenizer over `tokenizers.decoders.DecodeStream`: `push` ids one at a
    time, get back the text they complete.

    A character split across tokens is held back until it is complete, so no piece holds a
    broken one. `flush` (at the end of an answer) returns what is held back, without the
    incomplete character an answer cut off mid-character ends in: `"".join(pieces) + flush()
    == tokenizer.decode(all_ids).rstrip("\ufffd")`, and no U+FFFD is shown for a cut.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._reset()

    def _reset(self) -> None:
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip)
        self._context: list[int] = []  # the ids of the last piece (the stream's context)
        self._held: list[int] = []  # the ids pushed since

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete).
        Raises ValueError for an id out of range."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise ValueError(f"token id {token_id} out of range for vocabulary size {self._tokenizer.vocab_size}")
        self._held.append(token_id)
        piece = self._stream.step(self._tokenizer.backend, token_id)
        if piece is None:
            return ""
        self._context, self._held = self._held, []
        return piece

    def flush(self) -> str:
        """The held-back text, an incomplete last character dropped; the decoder starts afresh."""
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
        text = decode(self._context + self._held)[len(decode(self._context)) :]
        self._reset()
        return text.rstrip("\ufffd")


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


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} if the (optional) file does not exist."""
    return read_json(path) if path.exists() else {}


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

