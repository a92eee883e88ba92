"""Every example runs as a user would run it (on a tiny model, with small settings)."""

import subprocess
import sys
from pathlib import Path

import pytest

from knnmem.train.tokenizer import train_tokenizer
from knnmem.ingest import stdlib_texts

from conftest import sharp_model, tiny_config

pytestmark = pytest.mark.slow  # each example runs end to end

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer("\n".join(t for _, t in stdlib_texts("train")[:30]).splitlines(), path, vocab_size=600)
    sharp_model(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=32, last_context_length=32)).save_pretrained(path)
    return path


def run(script: str, *args, cwd) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_index_and_generate(model_dir, tmp_path):
    out = run("index_and_generate.py", "--model", model_dir, "--store", tmp_path / "store", cwd=tmp_path)
    assert "stored" in out and "->" in out
    assert (tmp_path / "store" / "manifest.json").exists()


def test_persist_and_reload_gives_identical_answers(model_dir, tmp_path):
    assert "identical" in run("persist_and_reload.py", "--model", model_dir, "--store", tmp_path / "s", cwd=tmp_path)


def test_compare_exact_vs_approx(model_dir, tmp_path):
    out = run("compare_exact_vs_approx.py", "--model", model_dir, "--tokens", "300", "--index", "Flat", "--k", "8",
              "--report", tmp_path / "r", cwd=tmp_path)
    assert "| dense | float32 | all |" in out and "| Flat | float32 | 8 |" in out
    assert (tmp_path / "r" / "comparison.json").exists()


def test_passkey(model_dir, tmp_path):
    out = run("passkey.py", "--model", model_dir, "--lengths", "160", "--trials", "1", "--index", "Flat", cwd=tmp_path)
    assert "| dense | 160 |" in out.replace(",", "") or "| dense |" in out


def test_train_fot_trains_and_resumes(tmp_path):
    args = ("--out", tmp_path / "run", "--steps", "4", "--hidden-size", "32", "--window", "32")
    assert "trained" in run("train_fot.py", *args, cwd=tmp_path)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").exists()
    assert "trained" in run("train_fot.py", *args, cwd=tmp_path)  # already complete: resumes and stops
