"""Chat templates: the jinja2 sandbox a model's chat template (untrusted code) is compiled and
rendered in, with limits on time and output size. Every failure is a `ChatTemplateError` naming
the template's source.

Built on jinja2's public API (the immutable sandbox and its `call_binop`, the parsed template
tree of `jinja2.nodes`, filters, `pass_eval_context`) plus four undocumented details, each
checked by `tests/test_tokenizer.py::test_jinja2_internals_the_sandbox_relies_on`, which is why
setup.cfg pins the tested jinja2 minor release:
  - the sandbox routes every call through `SandboxedEnvironment.call(context, obj, ...)`;
  - its `str.format` / `format_map` wrapper keeps the bound method as `__wrapped__`;
  - `Namespace` keeps its attributes in the name-mangled `_Namespace__attrs` dict;
  - filters taking the environment / context first carry a `jinja_pass_arg` attribute.
"""

from __future__ import annotations

import contextvars
import json
import re
import string
import time
import types
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from datetime import datetime
from functools import update_wrapper
from typing import Any, Callable, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from markupsafe import Markup

from ..core.errors import ChatTemplateError

CHAT_TEMPLATE_SECONDS = 2.0  # default limits of one chat-template rendering
CHAT_TEMPLATE_MAX_CHARS = 1_000_000


def compile_template(text: str, *, source: str) -> jinja2.Template:
    """Compile a chat template in the limited sandbox.

    Args:
      text: the template's source.
      source: where it came from, for the error message.
    Returns:
      the compiled template. Raises ChatTemplateError for a template that is too long, does not
      parse, or uses a constant the sandbox refuses.
    """
    if len(text) > _MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(
            f"{source}: {len(text)} characters, more than the limit of {_MAX_TEMPLATE_CHARS} for a chat template"
        )
    env = _template_environment()
    try:
        return env.from_string(_guard_tree(env.parse(text)))
    except Exception as err:  # TemplateSyntaxError, RecursionError of a deep template, ...
        raise ChatTemplateError(f"{source}: {_reason(err)}") from None


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
    if budget is None:  # rendered outside `render` (e.g. a test): default limits
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


_ITER, _LITERAL, _CONCAT = "tpmax_checked_iter", "tpmax_checked_literal", "tpmax_checked_concat"


def _guard_tree(node: nodes.Node) -> nodes.Node:
    """The parsed template with every list/tuple/dict literal and `~` sent through a filter
    that checks its size first, and the iterable of every `{% for %}` through one that checks
    the deadline at each item (public `jinja2.nodes` API; children before parents)."""
    for name, value in node.iter_fields():
        if isinstance(value, nodes.Node):
            setattr(node, name, _guard_tree(value))
        elif isinstance(value, list):
            setattr(node, name, [_guard_tree(v) if isinstance(v, nodes.Node) else v for v in value])
    filter_ = lambda n, name, args=(): nodes.Filter(n, name, list(args), [], None, None, lineno=n.lineno)  # noqa: E731
    if isinstance(node, nodes.For):
        node.iter = filter_(node.iter, _ITER)
    elif isinstance(node, (nodes.List, nodes.Dict)) or (isinstance(node, nodes.Tuple) and node.ctx == "load"):
        return filter_(node, _LITERAL)
    elif isinstance(node, nodes.Concat):
        return filter_(node.nodes[0], _CONCAT, node.nodes[1:])
    return node


def _checked_iter(iterable: Iterable) -> Iterator:
    """The items of a `{% for %}` loop, the deadline checked before each."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _checked_literal(value: Any) -> Any:
    return _budget().check(value, "a list, tuple or dict")


@jinja2.pass_eval_context
def _checked_concat(eval_ctx: Any, *values: Any) -> str:
    """`a ~ b ~ ...` as jinja2 joins it (Markup-aware under autoescape), its size checked first."""
    budget = _budget()
    budget.check_bound(sum(_size(v, budget) for v in values), "'~' concatenation")
    if eval_ctx.autoescape and any(hasattr(v, "__html__") for v in values):
        return Markup("").join(values)
    return "".join(map(str, values))


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
    env.filters["tojson"] = _tojson
    for name in ("urlize",):  # unbounded output, never used by chat templates
        env.filters.pop(name, None)
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _guard_filter(name, f, is_test=True) for name, f in env.tests.items()}
    env.filters.update({_ITER: _checked_iter, _LITERAL: _checked_literal, _CONCAT: _checked_concat})
    env.globals.pop("lipsum", None)  # random text of any length
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render(
    template: jinja2.Template,
    variables: Mapping[str, Any],
    *,
    source: str,
    max_seconds: float = CHAT_TEMPLATE_SECONDS,
    max_chars: int = CHAT_TEMPLATE_MAX_CHARS,
) -> str:
    """Render a template compiled by `compile_template` within the limits.

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


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like Hugging Face: no HTML escaping, unlike jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
