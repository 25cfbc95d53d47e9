"""The `tpmax` command, run for real in subprocesses: prompts, stop reasons, help, validation,
input files, progress, and the README synopsis that documents it.

Most tests use the tiny fixture model (`tests/fixtures/hf/llama`) with a word-level tokenizer
written beside it (words `w3` .. `w258` are token ids 3 .. 258); it loads in well under a
second. Only the `slow` tests load the real default model.
"""
import json
import shutil
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tpmax
from tpmax import cli as tpmax_cli

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
SUBCOMMANDS = ("generate", "perplexity", "serve", "info")


def cli(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "tpmax.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout)


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("tpmax: error:") and "Traceback" not in r.stderr, r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny llama fixture plus a word-level tokenizer: `w<i>` is token i, `<s>` = 1 (BOS)."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "hf" / "llama" / f, d / f)  # a symlink out of the model directory is refused
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 259)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))
    return d


def stats_of(r) -> dict:
    return json.loads(r.stderr.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# 1. Prompts: the words are one prompt; --prompt and --file give several.


def test_words_are_one_prompt(tiny):
    r = cli("generate", "--model", tiny, "--quiet", "--max-new-tokens", "2", "--stats", "w5", "w6", "w7")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and not r.stdout.startswith("[0]")
    s = stats_of(r)
    assert s["prefill_tokens"] == 4 and s["finish_reason"] == ["length"]  # BOS + 3 words, one prompt


def test_several_prompts_from_prompt_and_file(tiny, tmp_path):
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--stats", "--prompt", "w5 w6", "--prompt", "w7")
    assert r.returncode == 0, r.stderr
    assert [ln[:4] for ln in r.stdout.splitlines()] == ["[0] ", "[1] "]
    assert stats_of(r)["prefill_tokens"] == 5
    f = tmp_path / "prompts.txt"
    f.write_text("w5 w6\n\nw7\nw8 w9 w10\n")  # blank lines are skipped
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--stats", "--file", f)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and stats_of(r)["finish_reason"] == ["length"] * 3
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--file", "-", input="w3\nw4\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


@pytest.mark.parametrize("args, match", [
    (("w5", "--prompt", "w6"), "one way only"),
    (("--prompt", "w6", "--file", "-"), "one way only"),
    ((), "no prompt"),
    (("",), "empty"),
    (("--prompt", " "), "empty"),
])
def test_prompt_source_errors(tiny, args, match):
    r = cli("generate", "--model", tiny, *args, input="w3\n")
    assert match in one_line_error(r)


# ------------------------------------------------------------------------------------------
# 2. Why generation stopped.


def test_stop_reason_is_reported(tiny):
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "3", "--stats", "w5")
    assert r.returncode == 0, r.stderr
    assert "[stopped: reached --max-new-tokens 3]" in r.stderr and stats_of(r)["finish_reason"] == ["length"]
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "500", "w5")  # the fixture's context is 128
    assert r.returncode == 0 and "[stopped: reached the model's context length (128 tokens)]" in r.stderr, r.stderr


ERROR_RUN = """
import sys, types
import tpmax
g = sys.modules["tpmax.api"]
real = g.generate
def generate(model, prompts, *a, **kw):
    outs = real(model, prompts, *a, **kw)
    outs[1] = types.SimpleNamespace(**{**vars(outs[1]), "finish_reason": "error", "error": "boom: out of memory"})
    return outs
g.generate = generate
from tpmax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_prompt_is_named_and_exits_1(tiny):
    r = subprocess.run([sys.executable, "-c", ERROR_RUN, "generate", "--model", str(tiny), "-q", "--stats",
                        "--max-new-tokens", "2", "--prompt", "w5", "--prompt", "w6 w7 w8 w9 w10 w11 w12 w13",
                        "--prompt", "w9"], capture_output=True, text=True, timeout=120)
    assert [ln[:4] for ln in r.stdout.splitlines()] == ["[0] ", "[1] ", "[2] "]  # the others still print
    line = one_line_error(r, code=1)
    assert "prompt 1" in line and "w6 w7 w8" in line and "boom: out of memory" in line
    assert json.loads(r.stderr.splitlines()[-2])["finish_reason"] == ["length", "error", "length"]


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
    out = {}
    for sub in SUBCOMMANDS:
        r = cli(sub, "--help")
        assert r.returncode == 0, r.stderr
        out[sub] = r.stdout
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


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tpmax {tpmax.__version__}"


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
def test_generate_rejects_bad_values(args, match):
    r = cli("generate", "--model", "/not/loaded", *args, "hi")
    assert match in one_line_error(r)


def test_largest_seed_is_accepted(tiny):
    r = cli("generate", "--model", tiny, "-q", "--max-new-tokens", "2", "--temperature", "1", "--seed", str(2**64 - 1),
            "w5")
    assert r.returncode == 0, r.stderr


def test_perplexity_file_must_be_a_small_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, match in [(tmp_path, "directory"), (fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (tmp_path / "missing.txt", "cannot open")]:
        r = cli("perplexity", "--model", "/not/loaded", "--file", path, timeout=30)
        assert match in one_line_error(r), path
    r = cli("perplexity", "--model", "/not/loaded", "--file", "x", "--context-length", "1")
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


def test_errors_are_one_line():
    one_line_error(cli("generate", "--model", "/definitely/not/here", "hi"))
    assert "GPU" in one_line_error(cli("generate", "--devices", "gpu:7", "--model", FIX / "hf" / "llama", "hi"))
    r = cli("info", "--quiet")
    assert r.returncode == 0 and "nccl" in r.stdout


# ------------------------------------------------------------------------------------------
# 5, 6. Perplexity progress on stderr, silenced by --quiet.


def test_perplexity_shows_progress_unless_quiet(tiny, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(" ".join(f"w{3 + i % 250}" for i in range(300)))
    r = cli("perplexity", "--model", tiny, "--file", f, "--context-length", "64", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] > 0
    assert re.search(r"perplexity: (\d+)/\1 tokens \(100%\), running perplexity \d", r.stderr), r.stderr
    r = cli("perplexity", "--model", tiny, "--file", f, "--context-length", "64", "--json", "--quiet")
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
    p = tpmax_cli.Progress(plain, label="perplexity", every_s=3600)
    for done in (64, 128, 192):
        p(done, 192, 10.0)
    p.close()
    assert plain == ["perplexity: 192/192 tokens (100%), running perplexity 10.0000\n"]  # only the end, at this rate
    tty = Stream(True)
    p = tpmax_cli.Progress(tty, label="perplexity")
    p(64, 128, 12.5)
    p.close()
    assert tty[0].startswith("\r\x1b[K") and "64/128 tokens (50%)" in tty[0] and tty[-1] == "\r\x1b[K"


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
# The real default model.


@pytest.mark.slow
def test_cli_generate_streams_the_answer_with_stats():
    r = cli("generate", "--devices", "cpu:0,1", "--max-new-tokens", "16", "--stats", "What", "is", "the", "capital",
            "of", "France?", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and not r.stdout.startswith("[0]")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert set(stats) >= {"prefill_tokens", "prefill_s", "decode_tokens", "decode_s", "decode_tok_per_s",
                          "finish_reason"}
    assert stats["prefill_tokens"] > 0 and stats["decode_tokens"] > 0 and len(stats["finish_reason"]) == 1


@pytest.mark.slow
def test_cli_perplexity_json():
    ref = json.loads((FIX / "smollm2_reference.json").read_text())["perplexity"]
    r = cli("perplexity", "--devices", "cpu:0,1", "--file", FIX / "perplexity.txt", "--context-length", "128", "--json",
            timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == ref["scored_tokens"] and abs(out["perplexity"] - ref["perplexity"]) < 1e-3 * ref["perplexity"]
