"""The `tpmax` command line: a thin layer over `tpmax.load`, `tpmax.Engine` and
`tpmax.perplexity` that parses arguments, reads input files and reports results.

    tpmax generate [options] PROMPT...            (the words form one prompt)
    tpmax generate [options] --prompt TEXT [--prompt TEXT ...]
    tpmax generate [options] --file PATH          (one prompt per line; - = stdin)
    tpmax generate [options] < PROMPT_FILE        (a piped stdin is the prompt)
    tpmax chat [options]                          (one user turn per line of stdin)
    tpmax perplexity [options] --file PATH
    tpmax info [--model PATH [--devices SPEC]] [--clear-cache]

Each subcommand is a pair: `add_<name>_parser(sub)` declares its arguments and sets
`run=_<name>`; `_<name>(args)` runs it and returns the exit status. To add a subcommand,
write the pair and list the first half in `SUBCOMMANDS`. Every error is one line on stderr,
`tpmax: error: ...`: exit 2 for bad arguments, input or model, exit 1 when a prompt failed
during generation, exit 130 when Ctrl-C stopped it (what was produced is printed first).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

MAX_INPUT_BYTES = 64 << 20  # the most a --file may hold (64 MiB)
ABORT_GRACE_S = 5.0  # see main(): how long a rank > 0 lets rank 0 report an error every rank met


class CLIError(Exception):
    """A problem with the user's input: printed as `tpmax: error: <message>`, exit 2."""


# ------------------------------------------------------------------------------------------
# Argument types: each turns the text into a value or raises ArgumentTypeError with the reason.


def _int_in(lo: int, hi: int | None = None, hi_text: str | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            want = f">= {lo}" if hi is None else f"in {lo}..{hi_text or hi}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v
    return parse


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ------------------------------------------------------------------------------------------
# Parser.


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `tpmax: error: <what>` and exit 2, no usage dump."""

    def error(self, message: str):
        # Under mpirun every rank parses the same arguments: rank 0 alone says what is wrong.
        self.exit(2, None if _mpi_rank() else f"tpmax: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option that has a real default (not None/False/[])."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_subparser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of every subcommand that loads a model."""
    p.add_argument("--model", metavar="PATH",
                   help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct, fetched once "
                        "into the cache)")
    p.add_argument("--devices", default="cpu", type=_nonempty, metavar="SPEC",
                   help="devices to shard over: cpu, cpu:0,1 (virtual CPU devices), gpu:0,1, gpu:0,0")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype on the devices")
    p.add_argument("--threads", type=_int_in(1), metavar="N",
                   help="BLAS threads per process (default: the cores it may use, shared among the MPI ranks "
                        "on this host; OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, when set, decide instead)")
    add_quiet_arg(p)


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output on stderr")


# ------------------------------------------------------------------------------------------
# Reading input files: regular files or stdin only, never more than MAX_INPUT_BYTES.


def read_text(path: str, *, what: str, limit: int = MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of `path` ("-" = stdin), refusing what is not a regular file (a
    directory, a FIFO, a device such as /dev/zero) and anything over `limit` bytes."""
    from .core.errors import LoadError
    from .core.files import read_text as read_file, text_of

    try:
        if path == "-":
            return text_of(sys.stdin.buffer, name="stdin", limit=limit)
        return read_file(Path(path), limit=limit)
    except LoadError as e:
        raise CLIError(f"{what} {e}") from None


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/model, as model hubs name models


def _load(args):
    from .checkpoint.loader import load

    if args.model and HUB_NAME.fullmatch(args.model) and not Path(args.model).exists():
        raise CLIError(f"--model {args.model}: no such file or directory; tpmax reads models from disk and never "
                       f"downloads from a model hub: download the model's directory first (e.g. `huggingface-cli "
                       f"download {args.model} --local-dir DIR`, or git) and pass --model DIR")
    args.stage = "load"
    model = load(args.model, devices=args.devices, dtype=args.dtype, progress=not args.quiet, threads=args.threads)
    args.stage = "run"
    return model


# ------------------------------------------------------------------------------------------
# Answering: the options, the encoding and the engine loop `generate` and `chat` share.


def add_answer_args(p: argparse.ArgumentParser) -> None:
    """Sampling, stopping, the system prompt and --stats: the options of every command that answers."""
    p.add_argument("--system", type=_nonempty, metavar="TEXT",
                   help="a system message put before the prompt through the chat template")
    # Ranges are checked by SamplingParams (`params_of`), as everywhere sampling options arrive.
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P, in (0, 1]")
    p.add_argument("--seed", type=int, metavar="S",
                   help="random seed for sampling, 0..2^64-1 (default: a fresh seed each run)")
    p.add_argument("--stop", action="append", type=_nonempty, metavar="STR",
                   help="stop when the text contains STR, which is not printed (repeatable)")
    p.add_argument("--stats", action="store_true",
                   help="print one JSON line of timings and finish reasons on stderr (per answer in chat)")


def params_of(args):
    """The sampling options as one `SamplingParams`, which checks them (as it does for the API
    and the server); its error names the field first, shown here as the option."""
    from .generation.sampling import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()))
    except ValueError as e:
        raise CLIError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None


def answer(engine, prompts: list[list[int]], params, on_event) -> tuple[list, bool]:
    """Submit `prompts` (token ids) to `engine` and step it until every one is answered,
    calling `on_event(event)` for each event. Ctrl-C cancels the answers not yet finished:
    they keep what was produced (finish reason "cancelled").

    Returns:
        (the completions in prompt order, whether Ctrl-C interrupted). A Ctrl-C in the instant
        between a request's end and its event being read loses that completion: it is missing.
    """
    ids = [engine.submit(p, params) for p in prompts]
    done = {}
    try:
        while engine.busy:
            for ev in engine.step():
                if ev.completion is not None:
                    done[ev.completion.id] = ev.completion
                on_event(ev)
    except KeyboardInterrupt:
        done.update((i, engine.cancel(i)) for i in ids if i not in done)
        return [done[i] for i in ids if done[i] is not None], True
    return [done[i] for i in ids], False


def stop_notice(c, params, context: int) -> str | None:
    """Why generation of completion `c` stopped, when it did not end by itself."""
    if c.finish_reason == "stop":
        return None
    if c.finish_reason == "length":
        if len(c.tokens) >= params.max_new_tokens:
            return f"reached --max-new-tokens {params.max_new_tokens}"
        return f"reached the model's context length ({context} tokens)"
    if c.finish_reason == "cancelled":
        return "interrupted"
    if c.finish_reason == "error":
        return f"error: {getattr(c, 'error', None) or 'unknown'}"
    return c.finish_reason


def print_stats(stats, outs) -> None:
    print(json.dumps({**stats.as_dict(), "finish_reason": [c.finish_reason for c in outs]}), file=sys.stderr)


def _leading(model, run) -> int:
    """`run()` on rank 0, as one call the other MPI ranks follow step by step (they return 0);
    in one process just `run()`."""
    return model.executor.call(run, receive=lambda *_: 0)


# ------------------------------------------------------------------------------------------
# generate


def add_generate_parser(sub) -> None:
    g = _add_subparser(
        sub, "generate", "generate text for one or more prompts (streamed)",
        "Generate text. The words on the command line form ONE prompt (no quotes needed); for\n"
        "several prompts give --prompt once per prompt, or --file with one prompt per line; with\n"
        "none of these, a piped stdin is the prompt. One answer is streamed as it is produced;\n"
        "several prompts are generated together (continuous batching) and each is printed as\n"
        "'[i] text' when it is done. Ctrl-C stops: what was produced is printed, exit 130.")
    add_model_args(g)
    g.add_argument("--prompt", action="append", type=_nonempty, metavar="TEXT",
                   help="one prompt (repeatable: one per prompt)")
    g.add_argument("--file", metavar="PATH",
                   help="read prompts from a file, one per line, blank lines skipped ('-' = stdin)")
    add_answer_args(g)
    g.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    g.add_argument("words", nargs="*", metavar="PROMPT", help="the prompt, as one or more words")
    g.set_defaults(run=_generate)


def prompts_of(args) -> list[str]:
    """The prompts, from exactly one source: the words, --prompt, --file, or else a piped stdin
    (not under mpirun, which does not pass on the end of stdin: reading it would never end)."""
    sources = [name for name, given in (("PROMPT words", args.words), ("--prompt", args.prompt),
                                        ("--file", args.file)) if given]
    if len(sources) > 1:
        raise CLIError(f"give prompts one way only, not {' and '.join(sources)}")
    if (args.file == "-" or not sources) and _mpi_size() > 1:
        raise CLIError("under mpirun the prompt cannot come from stdin (mpirun does not pass on its end): "
                       "give it as words, with --prompt TEXT, or with --file PATH")
    if args.words:
        prompts = [" ".join(args.words)]
    elif args.prompt:
        prompts = args.prompt
    elif args.file:
        prompts = [line for line in read_text(args.file, what="--file").splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"--file {args.file}: no prompts (every line is blank)")
    elif sys.stdin is not None and not sys.stdin.isatty():
        prompts = [read_text("-", what="stdin").strip()]
        if not prompts[0]:
            raise CLIError("no prompt: stdin is empty (give it as words, with --prompt TEXT, or with --file PATH)")
    else:
        raise CLIError("no prompt: give it as words, with --prompt TEXT, with --file PATH, or on stdin")
    if not any(p.strip() for p in prompts):
        raise CLIError("the prompt is empty")
    return prompts


def encode(model, prompt: str, *, system: str | None, chat: bool) -> list[int]:
    """Token ids of one prompt: through the chat template unless `chat` is off, after the
    `system` message if one is given (which needs the template)."""
    from .generation.api import encode_chat, encode_prompt

    if system is None:
        return encode_prompt(model, prompt, chat=chat)
    if model.tokenizer is None or not model.tokenizer.has_chat_template:
        raise CLIError(f"--system needs a chat template; {model.path} has none")
    return encode_chat(model, [{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def _first_words(text: str, n: int = 6) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def _generate(args) -> int:
    if args.system is not None and args.no_chat:
        raise CLIError("--system needs the chat template: drop --no-chat")
    prompts = prompts_of(args)
    params = params_of(args)
    model = _load(args)
    return _leading(model, lambda: _generate_on_leader(args, model, prompts, params))


def _generate_on_leader(args, model, prompts: list[str], params) -> int:
    from .generation.engine import Engine, Stats, cache_tokens_for

    ids = [encode(model, p, system=args.system, chat=not args.no_chat) for p in prompts]
    batch, ctx = 16, model.cfg.max_seq_len
    stats = Stats()
    engine = Engine(model, max_batch=batch, cache_tokens=cache_tokens_for(model, ids, params, batch), stats=stats)
    single = len(prompts) == 1  # below, a completion's id is its prompt's index: a new engine counts from 0

    def show(ev):  # one answer: each piece as it comes; several: each answer when it is done
        if single:
            sys.stdout.write(ev.text)
        elif ev.completion is not None:
            sys.stdout.write(f"[{ev.completion.id}] {ev.completion.text}\n")
        sys.stdout.flush()

    outs, interrupted = answer(engine, ids, params, show)
    if single:
        sys.stdout.write("\n")
    else:  # the answers Ctrl-C cut short
        sys.stdout.writelines(f"[{c.id}] {c.text}\n" for c in outs if c.finish_reason == "cancelled")
    sys.stdout.flush()
    for c in outs:
        why = stop_notice(c, params, ctx)
        if why and c.finish_reason != "error":
            print(f"[{'' if single else f'{c.id} '}stopped: {why}]", file=sys.stderr)
    if args.stats:
        print_stats(stats, outs)
    failed = [c for c in outs if c.finish_reason == "error"]
    for c in failed:
        print(f"tpmax: error: prompt {c.id} ({_first_words(prompts[c.id])!r}) failed: "
              f"{getattr(c, 'error', None) or 'unknown error'}", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0


# ------------------------------------------------------------------------------------------
# chat


def add_chat_parser(sub) -> None:
    c = _add_subparser(
        sub, "chat", "a conversation: one user turn per line of stdin, answers streamed",
        "Talk with the model through its chat template. Each line read (from the terminal or a\n"
        "pipe) is one user turn; the answer is streamed as it is produced and kept in the\n"
        "conversation. Ctrl-C stops the answer, not the session; Ctrl-D (end of input) or a\n"
        "line '/exit' ends the session.")
    add_model_args(c)
    add_answer_args(c)
    c.set_defaults(run=_chat)


def read_turn(stream, *, limit: int = MAX_INPUT_BYTES) -> str | None:
    """The next line of `stream` (a text stream with a binary `.buffer`), without its newline;
    None at the end of input."""
    raw = stream.buffer.readline(limit + 1)
    if not raw:
        return None
    if len(raw) > limit:
        raise CLIError(f"stdin: a line longer than the {limit:,}-byte limit")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise CLIError(f"stdin: not UTF-8 ({e.reason} at byte {e.start})") from None


def _chat(args) -> int:
    params = params_of(args)
    model = _load(args)
    if args.leader and (model.tokenizer is None or not model.tokenizer.has_chat_template):
        raise CLIError(f"{model.path}: the model has no chat template; use tpmax generate --no-chat")
    return _leading(model, lambda: _chat_on_leader(args, model, params))


def _chat_on_leader(args, model, params) -> int:
    from .generation.api import encode_chat
    from .generation.engine import Engine, Stats

    tty = sys.stdin.isatty()
    if tty and not args.quiet:
        print(f"tpmax chat with {model.path}: Ctrl-C stops an answer, Ctrl-D or /exit ends the session",
              file=sys.stderr)
    engine = Engine(model, max_batch=1, cache_tokens=model.cfg.max_seq_len)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    while True:
        try:
            if tty:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = read_turn(sys.stdin)
        except KeyboardInterrupt:  # at the prompt: the session goes on
            print("\n(Ctrl-D or /exit ends the session)", file=sys.stderr)
            continue
        if line is None or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        turn = [*messages, {"role": "user", "content": line}]
        engine.stats = stats = Stats()
        try:
            outs, _ = answer(engine, [encode_chat(model, turn)], params,
                             lambda ev: (sys.stdout.write(ev.text), sys.stdout.flush()))
        except ValueError as e:  # this turn cannot be answered (too long for the context, ...)
            print(f"tpmax: error: {e}", file=sys.stderr)
            continue
        print(flush=True)
        for c in outs:
            why = stop_notice(c, params, model.cfg.max_seq_len)
            if why:
                print(f"[stopped: {why}]", file=sys.stderr)
            if c.finish_reason != "error":  # an interrupted answer stays, as far as it went
                messages = [*turn, {"role": "assistant", "content": c.text}]
        if args.stats:
            print_stats(stats, outs)


# ------------------------------------------------------------------------------------------
# perplexity


def add_perplexity_parser(sub) -> None:
    pp = _add_subparser(
        sub, "perplexity", "perplexity of a text file",
        "Perplexity of a UTF-8 text file, scored in non-overlapping windows of --context-length\n"
        "tokens. Progress (tokens done, running perplexity) goes to stderr unless --quiet.")
    add_model_args(pp)
    pp.add_argument("--file", required=True, metavar="PATH",
                    help=f"the text to score ('-' = stdin; at most {MAX_INPUT_BYTES >> 20} MiB)")
    pp.add_argument("--context-length", type=_int_in(2), default=512, metavar="N",
                    help="tokens per scored window, >= 2")
    pp.add_argument("--json", action="store_true",
                    help="print {\"perplexity\": ..., \"tokens\": ...} as JSON")
    pp.set_defaults(run=_perplexity)


def perplexity_line(done: int, total: int, ppl: float) -> str:
    return f"{done}/{total} tokens ({100 * done / max(total, 1):.0f}%), running perplexity {ppl:.4f}"


def _perplexity(args) -> int:
    from .generation.api import perplexity
    from .core.progress import Progress

    text = read_text(args.file, what="--file")
    model = _load(args)
    if model.tokenizer is None:
        raise CLIError(f"{model.path}: the model has no tokenizer")
    bar = None if args.quiet else Progress(sys.stderr, label="perplexity")
    try:
        ppl, n = perplexity(model, model.tokenizer.encode(text), context_length=args.context_length,
                            on_progress=bar and (lambda done, total, ppl: bar.show(perplexity_line(done, total, ppl),
                                                                                    last=done >= total)))
    finally:
        if bar:
            bar.close()
    print(json.dumps({"perplexity": ppl, "tokens": n}) if args.json else f"perplexity {ppl:.4f} over {n} tokens")
    return 0


# ------------------------------------------------------------------------------------------
# info


def add_info_parser(sub) -> None:
    i = _add_subparser(sub, "info", "backends, devices, NCCL; with --model, its quantization and bytes per device",
                       "Versions of tpmax, NumPy and CuPy, the GPUs found, and whether NCCL is available. "
                       "With --model, also load that model and show its quantization and the weight bytes "
                       "each device holds against float32.")
    i.add_argument("--model", metavar="PATH", help="HF model directory or .gguf file to load and describe")
    i.add_argument("--devices", default="cpu", type=_nonempty, metavar="SPEC", help="devices to load --model on")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype of --model's unquantized tensors")
    i.add_argument("--clear-cache", action="store_true",
                   help="delete the GGUF shard cache (rebuilt at the next load; downloaded models stay)")
    add_quiet_arg(i)
    i.set_defaults(run=_info, threads=None)


def _info(args) -> int:
    import numpy as np

    from . import __version__
    from .checkpoint import shard_cache
    from .core.comm import nccl_available
    from .core.devices import cupy_version, gpu_count

    info = {"tpmax": __version__, "numpy": np.__version__, "cupy": cupy_version(), "gpus": gpu_count(),
            "nccl": nccl_available()}
    for k, v in info.items():
        print(f"{k:7s} {v}")
    print("devices cpu:0,1,... (virtual)" + (f", gpu:0..{info['gpus'] - 1}" if info["gpus"] else ""))
    if args.clear_cache:
        print(f"cleared {shard_cache.clear() / 2**20:.0f} MiB of shard cache")
    print(f"cache   {shard_cache.describe()}")
    if args.model:
        from .nn.quant import resident_bytes

        model = _load(args)
        print(f"model   {model!r}")
        print(f"quant   {model.quant.describe() if model.quant else 'none'}")
        for dev, (held, f32) in zip(model.devices, resident_bytes(model.weights)):
            print(f"{str(dev):7s} {held / 2**20:.3f} MiB resident ({held / f32:.2f} of float32 {f32 / 2**20:.3f} MiB)")
    return 0


# ------------------------------------------------------------------------------------------
# serve


def add_serve_parser(sub) -> None:
    s = _add_subparser(
        sub, "serve", "an OpenAI-compatible HTTP server (continuous batching across clients)",
        "Serve a model over the OpenAI HTTP API: POST /v1/chat/completions and /v1/completions (streamed "
        "or not), GET /v1/models, /health, /metrics. Binds to loopback unless --host says otherwise; "
        "SIGTERM finishes the requests in flight, then exits. See docs/serve.md.")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    s.add_argument("--port", type=_int_in(0, 65535), default=8000, help="TCP port")
    s.add_argument("--max-batch", type=_int_in(1), default=16, help="most requests decoding at once")
    s.add_argument("--max-queue", type=_int_in(0), default=64,
                   help="requests that may wait beyond --max-batch; more are answered 429 at once")
    s.add_argument("--cache-tokens", type=_int_in(1), default=8192, help="KV cache capacity in tokens")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (default: the model's file or directory name)")
    s.add_argument("--max-body-bytes", type=_int_in(1), default=4 * 2**20,
                   help="largest request body; a larger one is answered 413 (default 4 MiB)")
    s.set_defaults(run=_serve)


def _serve(args) -> int:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"tpmax serve needs the [serve] extra ({' and '.join(missing)} missing): in the tpmax "
                       f"checkout, pip install -e '.[serve]'")
    from .serving.app import run_serve

    args.stage = "load"
    return run_serve(args)


# ------------------------------------------------------------------------------------------
# main


SUBCOMMANDS = (add_generate_parser, add_chat_parser, add_perplexity_parser, add_serve_parser, add_info_parser)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="tpmax", description="Tensor-parallel transformer inference.")
    p.add_argument("--version", action="version", version=f"tpmax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def _mpi_rank() -> int:
    """This process's MPI rank (0 without an MPI launcher; mpi4py is imported only under one)."""
    from .parallel.mpi import launched_by_mpi, world

    return world().rank if launched_by_mpi() else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = _mpi_rank()
    args.leader, args.stage = rank == 0, "input"
    if not args.leader:  # under mpirun only rank 0 prints; the other ranks compute with it
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
    from .parallel.executor import LeaderError

    try:
        return args.run(args)
    except LeaderError:
        return 2  # rank 0 failed and said why
    except (CLIError, ValueError, RuntimeError, KeyError, OSError) as e:
        # Under MPI, by when it happened:
        # - reading the arguments and input files: alike on every rank, no rank waits on
        #   another yet: rank 0 reports it, every rank exits 2;
        # - inside a call rank 0 leads, on rank 0: it told the others (they exit 2 quietly);
        # - anything else (loading, a rank breaking while it follows): this rank ends the
        #   whole job, since the others may be waiting on it. A rank that ends the job says
        #   why first (MPI's abort message follows). A bad value or checkpoint (ValueError,
        #   LoadError) at load is met by every rank alike: the other ranks give rank 0
        #   ABORT_GRACE_S to report it and end the job, so it is said once, not lost when
        #   another rank's abort kills rank 0 before it printed.
        mpi = _mpi_size() > 1
        aborting = mpi and args.stage != "input" and not getattr(e, "tpmax_followers_told", False)
        if aborting and not args.leader and args.stage == "load" and isinstance(e, ValueError):
            time.sleep(ABORT_GRACE_S)
        if args.leader or aborting:
            print(f"tpmax: error: {e}" if args.leader else f"tpmax (rank {rank}): error: {e}", file=sys.stderr)
        if aborting:
            _abort(2)
        return 2
    except KeyboardInterrupt:
        return 130


def _mpi_size() -> int:
    from .parallel.mpi import launched_by_mpi, world

    return world().size if launched_by_mpi() else 1


def _abort(code: int) -> None:
    from .parallel.mpi import world

    sys.stderr.flush()
    world().comm.Abort(code)


if __name__ == "__main__":
    sys.exit(main())
