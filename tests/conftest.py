"""Shared test helpers: device groups, hypothesis profile, the tiny chat model directory."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

import tpmax

FIX = Path(__file__).parent / "fixtures"

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")

requires_gpu = pytest.mark.skipif(tpmax.gpu_count() == 0, reason="no CUDA GPU (CuPy missing or no device)")


def cpu_group(n):
    return tpmax.devices("cpu:" + ",".join(map(str, range(n))))


def make_chat_model_dir(d: Path, *, context: int | None = None) -> Path:
    """The tiny llama fixture plus a byte-level tokenizer (ids 0-2 <unk> <s> </s>, then the
    256 bytes: 259 = the fixture's vocabulary) and a chat template, written into `d`;
    `context` overrides its max_position_embeddings (128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d.mkdir(parents=True, exist_ok=True)
    for f in ("generation_config.json", "model.safetensors"):
        if not (d / f).exists():
            shutil.copy(FIX / "hf" / "llama" / f, d / f)  # a symlink out of the model directory is refused
    cfg = json.loads((FIX / "hf" / "llama" / "config.json").read_text())
    cfg["max_position_embeddings"] = context or cfg["max_position_embeddings"]
    (d / "config.json").write_text(json.dumps(cfg))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}))
    return d
