"""The `tpmax` command: prompts, streaming, Ctrl-C, chat, stop reasons, help, validation,
input files, progress, and the README synopsis that documents it.

Most tests call `tpmax.cli.main(argv)` in this process (`run`); a few run the real command
in a subprocess (`cli`): --version's imports, a real SIGINT, errors and MPI. They use the
tiny fixture model (`tests/fixtures/hf/llama`) with a word-level tokenizer written beside it
(words `w3` .. `w258` are token ids 3 .. 258); it loads in well under a second. Only the
`slow` tests load the real default model.
"""
import configparser
import io
import json
import shutil
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tpmax
from tpmax import cli as tpmax_cli
from tpmax.core.progress import Progress

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
SUBCOMMANDS = ("generate", "chat", "perplexity", "serve", "info")
ENGINE = tpmax.Engine


def cli(*args, input=None, timeout=120):
    """The real command in a subprocess (stdin: `input`, else empty)."""
    return subprocess.run([sys.executable, "-m", "tpmax.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout)


class Stdin(io.TextIOWrapper):
    """A stdin holding `text`: a pipe, or a terminal when `tty`."""

    def __init__(self, text: str = "", tty: bool = False):
        super().__init__(io.BytesIO(text.encode()), encoding="utf-8")
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def run(capsys, monkeypatch):
    """`run(*argv, input=None, tty=False)`: `tpmax.cli.main(argv)` in this process, stdin a
    pipe holding `input` (a terminal when `tty`); returns (returncode, stdout, stderr)."""
    def call(*args, input="", tty=False):
        monkeypatch.setattr(sys, "stdin", Stdin(input, tty))
        try:
            code = tpmax_cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("tpmax: error:") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def tiny_model(d: Path, template: str | None = None) -> Path:
    """The tiny llama fixture plus a word-level tokenizer (`w<i>` is token i, `<s>` = 1 (BOS),
    `</s>` = 2 (EOS)) and, if given, a chat template."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    d.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "hf" / "llama" / f, d / f)  # a symlink out of the model directory is refused
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 259)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                         **({"chat_template": template} if template else {})}))
    return d


# Roles and the generation prompt are words of the tiny vocabulary: system w3, user w4, assistant w5.
TEMPLATE = ("{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m['role']] }} "
            "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny_chat") / "m", TEMPLATE)


def stats_of(r) -> dict:
    return json.loads(r.stderr.strip().splitlines()[-1])


class Steps:
    """Counts `Engine.step` calls; `interrupt_at=k` makes the k-th call raise KeyboardInterrupt
    (`signal=True`: send this process a real SIGINT instead)."""

    def __init__(self, monkeypatch, interrupt_at=None):
        self.n, real = 0, ENGINE.step

        def step(engine):
            self.n += 1
            if self.n == interrupt_at:
                raise KeyboardInterrupt
            return real(engine)
        monkeypatch.setattr(ENGINE, "step", step)


class Submitted(list):
    """The token ids of every prompt submitted to an Engine."""

    def __init__(self, monkeypatch):
        super().__init__()
        real = ENGINE.submit

        def submit(engine, prompt, *a, **kw):
            self.append([int(t) for t in prompt])
            return real(engine, prompt, *a, **kw)
        monkeypatch.setattr(ENGINE, "submit", submit)


# ------------------------------------------------------------------------------------------
# 1. Prompts: the words are one prompt; --prompt and --file give several; else a piped stdin.


def test_words_are_one_prompt(run, tiny):
    r = run("generate", "--model", tiny, "--quiet", "--max-new-tokens", "2", "--stats", "w5", "w6", "w7")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and not r.stdout.startswith("[0]")
    s = stats_of(r)
    assert s["prefill_tokens"] == 4 and s["finish_reason"] == ["length"]  # BOS + 3 words, one prompt


def test_several_prompts_from_prompt_and_file(run, tiny, tmp_path):
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--stats", "--prompt", "w5 w6", "--prompt", "w7")
    assert r.returncode == 0, r.stderr
    assert sorted(ln[:4] for ln in r.stdout.splitlines()) == ["[0] ", "[1] "]
    assert stats_of(r)["prefill_tokens"] == 5
    f = tmp_path / "prompts.txt"
    f.write_text("w5 w6\n\nw7\nw8 w9 w10\n")  # blank lines are skipped
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--stats", "--file", f)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and stats_of(r)["finish_reason"] == ["length"] * 3
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--file", "-", input="w3\nw4\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_piped_stdin_is_the_prompt(run, tiny):
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--stats", input="w5 w6\nw7\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and stats_of(r)["prefill_tokens"] == 4  # BOS + 3 words: one prompt
    assert "stdin is empty" in one_line_error(run("generate", "--model", tiny, input=" \n"))
    assert "no prompt" in one_line_error(run("generate", "--model", tiny, tty=True))  # a terminal is not read


@pytest.mark.parametrize("args, match", [
    (("w5", "--prompt", "w6"), "one way only"),
    (("--prompt", "w6", "--file", "-"), "one way only"),
    (("",), "empty"),
    (("--prompt", " "), "empty"),
])
def test_prompt_source_errors(run, tiny, args, match):
    r = run("generate", "--model", tiny, *args, input="w3\n")
    assert match in one_line_error(r)


# ------------------------------------------------------------------------------------------
# 2. Streaming, Ctrl-C, --system and why generation stopped.


class Writes(list):
    """A stdout recording (Engine.step calls so far, text) for each non-empty write."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def write(self, text):
        if text:
            self.append((self.steps.n, text))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass


def test_one_answer_streams_and_several_print_as_each_finishes(tiny, monkeypatch):
    steps = Steps(monkeypatch)
    out = Writes(steps)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", Stdin(tty=True))
    assert tpmax_cli.main(["generate", "--model", str(tiny), "-q", "--max-new-tokens", "5", "w5"]) == 0
    assert [n for n, _ in out] == [1, 2, 3, 4, 5, 5]  # one piece per step, then the newline
    out.clear()
    steps.n = 0
    # Prompt 1 fills the 128-token context after 3 new tokens; prompt 0 goes on to 8.
    long = " ".join(["w9"] * 124)
    assert tpmax_cli.main(["generate", "--model", str(tiny), "-q", "--max-new-tokens", "8", "--prompt", "w5",
                           "--prompt", long]) == 0
    assert [(n, text[:4]) for n, text in out] == [(3, "[1] "), (8, "[0] ")]


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_ctrl_c_keeps_what_was_produced(run, tiny, monkeypatch, n_prompts):
    prompts = [a for i in range(n_prompts) for a in ("--prompt", f"w{5 + i}")]
    full = run("generate", "--model", tiny, "-q", "--max-new-tokens", "3", *prompts)  # what 3 steps produce
    Steps(monkeypatch, interrupt_at=4)
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "9", "--stats", *prompts)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(full.stdout.splitlines())
    assert stats_of(r)["finish_reason"] == ["cancelled"] * n_prompts
    assert r.stderr.count("stopped: interrupted]") == n_prompts


SIGINT_RUN = """
import os, signal, sys
import tpmax
from tpmax.cli import main
real, n = tpmax.Engine.step, [0]
def step(engine):  # a real Ctrl-C, during the third step
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return real(engine)
tpmax.Engine.step = step
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_sigint_stops_without_a_traceback(tiny):
    r = subprocess.run([sys.executable, "-c", SIGINT_RUN, "generate", "--model", str(tiny), "-q", "--stats",
                        "--max-new-tokens", "9", "w5"], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert "[stopped: interrupted]" in r.stderr and stats_of(r)["finish_reason"] == ["cancelled"]
    assert 1 <= len(r.stdout.split()) < 9


def test_system_prompt_goes_through_the_chat_template(run, tiny, tiny_chat, monkeypatch):
    from tpmax.generation.api import encode_chat

    sent = Submitted(monkeypatch)
    r = run("generate", "--model", tiny_chat, "-q", "--max-new-tokens", "2", "--system", "w10 w11", "w12")
    assert r.returncode == 0, r.stderr
    model = tpmax.load(str(tiny_chat), progress=False)
    assert sent == [encode_chat(model, [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12"}])]
    assert sent[0] == [1, 3, 10, 11, 4, 12, 5]  # BOS, then the template's words
    assert "--no-chat" in one_line_error(run("generate", "--model", tiny_chat, "--system", "w3", "--no-chat", "w5"))
    assert "has none" in one_line_error(run("generate", "--model", tiny, "-q", "--system", "w3", "w5"))


def test_stop_reason_is_reported(run, tiny):
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "3", "--stats", "w5")
    assert r.returncode == 0, r.stderr
    assert "[stopped: reached --max-new-tokens 3]" in r.stderr and stats_of(r)["finish_reason"] == ["length"]
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "500", "w5")  # the fixture's context is 128
    assert r.returncode == 0 and "[stopped: reached the model's context length (128 tokens)]" in r.stderr, r.stderr


def test_no_replacement_character_at_a_cut_off(run, tmp_path):
    import conftest

    chat = conftest.make_chat_model_dir(tmp_path / "bytes")  # one token per byte: cuts inside characters
    ends = []
    for seed in range(12):
        r = run("generate", "--model", chat, "-q", "--max-new-tokens", "1", "--temperature", "1", "--seed", seed,
                "--stats", "hi")
        assert r.returncode == 0, r.stderr
        if stats_of(r)["finish_reason"] == ["length"]:
            ends.append(r.stdout[:-1])
    assert ends and not [e for e in ends if e.endswith("\ufffd")], ends


def test_a_failed_prompt_is_named_and_exits_1(run, tiny, monkeypatch):
    class Boom:  # a detokenizer that fails: prompt 1's first token ends it with "error"
        def push(self, token):
            raise RuntimeError("boom: out of memory")

    real, n = ENGINE.submit, []

    def submit(engine, prompt, params, detokenizer=None):
        n.append(1)
        return real(engine, prompt, params, detokenizer=Boom() if len(n) == 2 else detokenizer)
    monkeypatch.setattr(ENGINE, "submit", submit)
    r = run("generate", "--model", tiny, "-q", "--stats", "--max-new-tokens", "2", "--prompt", "w5",
            "--prompt", "w6 w7 w8 w9 w10 w11 w12 w13", "--prompt", "w9")
    assert sorted(ln[:4] for ln in r.stdout.splitlines()) == ["[0] ", "[1] ", "[2] "]  # the others still print
    line = one_line_error(r, code=1)
    assert "prompt 1" in line and "w6 w7 w8" in line and "boom: out of memory" in line
    assert json.loads(r.stderr.splitlines()[-2])["finish_reason"] == ["length", "error", "length"]


# ------------------------------------------------------------------------------------------
# Chat: turns from stdin, the conversation kept, Ctrl-C stops one answer.


def test_chat_keeps_the_conversation(run, tiny_chat, monkeypatch):
    from tpmax.generation.api import encode_chat

    sent = Submitted(monkeypatch)
    r = run("chat", "--model", tiny_chat, "-q", "--max-new-tokens", "3", "--system", "w10",
            input="w11 w12\n\nw13\n/exit\nw14\n")  # the blank line is skipped, /exit ends before w14
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    model = tpmax.load(str(tiny_chat), progress=False)
    turns = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w11 w12"}]
    assert sent[0] == encode_chat(model, turns)
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "w13"}]
    assert sent[1] == encode_chat(model, turns) and len(sent) == 2


def test_chat_ctrl_c_stops_the_answer_not_the_session(run, tiny_chat, monkeypatch):
    sent = Submitted(monkeypatch)
    Steps(monkeypatch, interrupt_at=3)
    r = run("chat", "--model", tiny_chat, "-q", "--max-new-tokens", "6", "--stats", input="w11\nw12\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    cut, whole = r.stdout.splitlines()
    assert len(cut.split()) == 2 and len(whole.split()) == 6  # two steps, then Ctrl-C; the next turn in full
    assert r.stderr.count("[stopped: interrupted]") == 1
    assert [json.loads(ln)["finish_reason"] for ln in r.stderr.splitlines() if ln.startswith("{")] == [
        ["cancelled"], ["length"]]
    assert sent[1][:len(sent[0])] == sent[0] and len(sent[1]) == len(sent[0]) + 2 + 2 + 1  # + cut, w4 w12, w5


def test_chat_turn_errors_end_only_that_turn(run, tiny, tiny_chat):
    r = run("chat", "--model", tiny_chat, "-q", "--max-new-tokens", "2", input=" ".join(["w9"] * 200) + "\nw11\n")
    assert r.returncode == 0, r.stderr
    assert "tpmax: error:" in r.stderr and "context" in r.stderr and len(r.stdout.splitlines()) == 1
    assert "no chat template" in one_line_error(run("chat", "--model", tiny, "-q", input="w5\n"))


# ------------------------------------------------------------------------------------------
# 3. --help and --version.


def help_entries(text: str) -> dict[str, str]:
    """`{option or positional: its help text}` from an argparse --help page."""
    entries, key = {}, None
    for line in text.split("\n\n", 2)[-1].splitlines():
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m and not line.startswith("   "):
            names = re.findall(r"(?:^|, )(-{1,2}[\w-]+)", m.group(1))  # "-h, --help", "--dtype {a,b}"
            key = max(names, key=len) if names else m.group(1)
            entries[key] = m.group(2) or ""
        elif key and line.startswith("   "):
            entries[key] = (entries[key] + " " + line.strip()).strip()
    return entries


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    import contextlib
    from unittest import mock

    out = {}
    for sub in SUBCOMMANDS:
        with mock.patch.dict(os.environ, COLUMNS="100"), contextlib.redirect_stdout(io.StringIO()) as page, \
                pytest.raises(SystemExit) as e:
            tpmax_cli.main([sub, "--help"])
        assert e.value.code == 0
        out[sub] = page.getvalue()
    return out


def test_help_has_text_and_defaults_for_every_option(helps):
    for sub, text in helps.items():
        entries = help_entries(text)
        assert "--help" in entries
        for opt, desc in entries.items():
            assert desc, f"tpmax {sub} --help: {opt} has no help text"
    gen, ppl = help_entries(helps["generate"]), help_entries(helps["perplexity"])
    for opt, default in [("--max-new-tokens", "256"), ("--top-k", "0"), ("--top-p", "1.0"), ("--devices", "cpu"),
                         ("--dtype", "float32"), ("--temperature", "0.0")]:
        assert f"(default: {default})" in gen[opt], (opt, gen[opt])
    assert "(default:" in gen["--seed"] and "(default:" in gen["--model"]
    assert "(default: 512)" in ppl["--context-length"] and "(default: cpu)" in ppl["--devices"]


def test_version_imports_no_numeric_stack():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tpmax.cli", "--version"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == f"tpmax {tpmax.__version__}"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "tpmax" in imported and not imported & {"numpy", "tokenizers", "safetensors", "gguf", "jinja2"}


# ------------------------------------------------------------------------------------------
# 4. Validation: one line, exit 2, before any model is loaded.


@pytest.mark.parametrize("args, match", [
    (("--stop", ""), "--stop"),
    (("--temperature", "nan"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--temperature", "-1"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-k", "-1"), "--top-k"),
    (("--seed", "-1"), "--seed"),
    (("--seed", str(2**64)), "--seed"),
    (("--devices", ""), "--devices"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
])
def test_generate_rejects_bad_values(run, args, match):
    r = run("generate", "--model", "/not/loaded", *args, "hi")
    assert match in one_line_error(r)


def test_largest_seed_is_accepted(run, tiny):
    r = run("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--temperature", "1", "--seed", str(2**64 - 1),
            "w5")
    assert r.returncode == 0, r.stderr


def test_perplexity_file_must_be_a_small_regular_file(run, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in [(tmp_path, "directory"), (fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (tmp_path / "missing.txt", "cannot open")]:
        r = run("perplexity", "--model", "/not/loaded", "--file", path)  # never opened: a FIFO cannot block
        assert match in one_line_error(r), path
    r = run("perplexity", "--model", "/not/loaded", "--file", "x", "--context-length", "1")
    assert "--context-length" in one_line_error(r)


def test_read_text_limit(tmp_path):
    f = tmp_path / "big.txt"
    f.write_bytes(b"a" * 101)
    assert tpmax_cli.read_text(str(f), what="--file", limit=101) == "a" * 101
    with pytest.raises(tpmax_cli.CLIError, match="limit"):
        tpmax_cli.read_text(str(f), what="--file", limit=100)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(tpmax_cli.CLIError, match="not UTF-8"):
        tpmax_cli.read_text(str(f), what="--file")


def test_errors_are_one_line(run):
    one_line_error(cli("generate", "--model", "/definitely/not/here", "hi"))  # the real command
    assert "GPU" in one_line_error(run("generate", "--devices", "gpu:7", "--model", FIX / "hf" / "llama", "hi"))
    r = run("info", "--quiet")
    assert r.returncode == 0 and "nccl" in r.stdout


def test_hub_names_say_what_to_do(run):
    line = one_line_error(run("generate", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "hi"))
    assert "never downloads" in line and "download HuggingFaceTB/SmolLM2-135M-Instruct" in line


def test_serve_without_its_extra_says_how_to_install_it(run, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert "pip install -e '.[serve]'" in one_line_error(run("serve", "--model", tiny, "-q"))


def test_bench_extra_does_not_pull_torch():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    bench = {re.split(r"[<>=\[ ]", line)[0] for line in cfg["options.extras_require"]["bench"].split() if line}
    assert bench and not bench & {"torch", "accelerate"}  # accelerate requires torch: pip picks a CUDA build


# ------------------------------------------------------------------------------------------
# 5, 6. Perplexity progress on stderr, silenced by --quiet.


def test_perplexity_shows_progress_unless_quiet(run, tiny, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join(f"w{3 + i % 250}" for i in range(300)))
    r = run("perplexity", "--model", tiny, "--file", f, "--context-length", "64", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] > 0
    assert re.search(r"perplexity: (\d+)/\1 tokens \(100%\), running perplexity \d", r.stderr), r.stderr
    r = run("perplexity", "--model", tiny, "--file", f, "--context-length", "64", "--json", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_progress_lines():
    class Stream(list):
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            self.append(s)

        def flush(self):
            pass

    plain = Stream(False)
    p = Progress(plain, label="perplexity", every_s=3600)
    for done in (64, 128, 192):
        p.show(tpmax_cli.perplexity_line(done, 192, 10.0), last=done == 192)
    p.close()
    assert plain == ["perplexity: 192/192 tokens (100%), running perplexity 10.0000\n"]  # only the end, at this rate
    tty = Stream(True)
    p = Progress(tty, label="perplexity")
    p.show(tpmax_cli.perplexity_line(64, 128, 12.5))
    p.close()
    assert tty[0].startswith("\r\x1b[K") and "64/128 tokens (50%)" in tty[0] and tty[-1] == "\r\x1b[K"
    tty = Stream(True)  # a line that stays: the last text, then a newline
    Progress(tty, label="loading").close("done in 1.0 s")
    assert tty == ["\r\x1b[Kloading: done in 1.0 s", "\n"]


# ------------------------------------------------------------------------------------------
# 7. The README documents every option and every --stats key.


def readme_synopsis() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n.*?```\n(.*?)```", text, re.S).group(1)
    out = {}
    for entry in re.split(r"\n(?=tpmax )", block.strip()):
        out[entry.split()[1]] = entry
    return out


def test_readme_synopsis_lists_every_option(helps):
    synopsis = readme_synopsis()
    assert set(synopsis) >= set(SUBCOMMANDS)
    for sub, text in helps.items():
        for opt in help_entries(text):
            if opt.startswith("--") and opt != "--help":
                assert re.search(rf"{re.escape(opt)}\b", synopsis[sub]), f"README synopsis of {sub} lacks {opt}"


def test_readme_lists_every_stats_key():
    text = (ROOT / "README.md").read_text()
    for key in [*tpmax.Stats().as_dict(), "finish_reason"]:
        assert f"`{key}`" in text, key


# ------------------------------------------------------------------------------------------
# Under mpirun.

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def mpi_cli(*args, input=None):
    """`mpirun -n 2 tpmax ARGS` (stdin: `input`, else empty), ended if it runs over 120 s."""
    from tpmax.parallel import mpi

    env = {k: v for k, v in os.environ.items() if k not in mpi.LAUNCHER_ENV}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-m", "tpmax.cli",
                             *map(str, args)], env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    return types.SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="needs mpirun: pip install -e '.[mpi]'")


@needs_mpirun
def test_an_error_every_rank_meets_is_said_once_before_the_abort():
    r = mpi_cli("generate", "--devices", "cpu:0,1", "--model", "/no/such/model", "-q", "hi")
    assert r.returncode != 0 and r.stdout == ""
    assert [ln for ln in r.stderr.splitlines() if "error:" in ln] == [
        "tpmax: error: /no/such/model: no such file or directory"], r.stderr


@needs_mpirun
@pytest.mark.parametrize("source", [(), ("--file", "-")])
def test_under_mpirun_stdin_is_refused_not_waited_for(tiny, source):
    r = mpi_cli("generate", "--devices", "cpu:0,1", "--model", tiny, "-q", *source, input="w5\n")  # no EOF comes
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("tpmax: error: under mpirun the prompt cannot come from stdin") == 1, r.stderr


@needs_mpirun
def test_chat_under_mpirun_equals_one_process(run, tiny_chat):
    turns = "w11 w12\nw13\n/exit\n"  # mpirun does not pass on the end of stdin: /exit ends the session
    r = mpi_cli("chat", "--devices", "cpu:0,1", "--model", tiny_chat, "-q", "--max-new-tokens", "3", input=turns)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run("chat", "--devices", "cpu:0,1", "--model", tiny_chat, "-q", "--max-new-tokens", "3", input=turns)
    assert r.stdout == one.stdout and len(one.stdout.splitlines()) == 2


# ------------------------------------------------------------------------------------------
# The real default model.


@pytest.mark.slow
def test_cli_generate_answers_and_stops_at_the_models_eos():
    # Default sampling (greedy, no --stop): the model's own end-of-sequence token ends the answer.
    r = cli("generate", "--devices", "cpu:0,1", "--max-new-tokens", "64", "--stats", "What", "is", "the", "capital",
            "of", "France?", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and not r.stdout.startswith("[0]")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert set(stats) >= {"prefill_tokens", "prefill_s", "decode_tokens", "decode_s", "decode_tok_per_s",
                          "finish_reason"}
    assert stats["finish_reason"] == ["stop"] and "[stopped" not in r.stderr, r.stderr
    assert 0 < stats["decode_tokens"] < 64 and stats["prefill_tokens"] > 0


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_commands_name_files_that_exist():
    files = [f for block in readme_blocks("bash") for f in re.findall(r"--file (\S+)", block)]
    assert files and all((ROOT / f).is_file() for f in files), files


@pytest.mark.slow
def test_readme_python_example_runs_as_written():
    (code,) = [b for b in readme_blocks("python") if "tpmax.load" in b]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]


@pytest.mark.slow
def test_cli_perplexity_json():
    ref = json.loads((FIX / "smollm2_reference.json").read_text())["perplexity"]
    r = cli("perplexity", "--devices", "cpu:0,1", "--file", FIX / "perplexity.txt", "--context-length", "128", "--json",
            timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == ref["scored_tokens"] and abs(out["perplexity"] - ref["perplexity"]) < 1e-3 * ref["perplexity"]
