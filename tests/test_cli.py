"""The command line end to end on a tiny model: every command works, bad input gives one clear line."""

import json

import pytest
import torch

import knnmem
from knnmem.cli import main, parse_tokens
from knnmem.store.manifest import checksum
from knnmem.train.tokenizer import train_tokenizer
from knnmem.ingest import stdlib_texts

from conftest import sharp_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    text = "\n".join(t for _, t in stdlib_texts("train")[:30])
    tokenizer = train_tokenizer(text.splitlines(), path, vocab_size=600)
    config = tiny_config(vocab_size=len(tokenizer), max_position_embeddings=16, last_context_length=16)
    sharp_model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, (_, text) in enumerate(stdlib_texts("heldout")[:3]):
        (folder / f"doc{i}.txt").write_text(text[:1500])
    return folder


@pytest.fixture(scope="module")
def store(model_dir, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("indexes") / "docs"
    assert main(["index", str(corpus), "--model", str(model_dir), "--out", str(path), "--index", "Flat", "--k", "8"]) == 0
    return path


def test_index_and_info(store, capsys):
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "Flat" in out and "doc0.txt" in out and "documents:" in out.replace(" ", "")


def test_index_in_shards_then_info_and_explained_generation(model_dir, corpus, tmp_path, capsys):
    store = tmp_path / "sharded"
    assert main(["index", str(corpus), "--model", str(model_dir), "--out", str(store), "--index", "Flat", "--k", "8",
                 "--shards", "3"]) == 0
    assert "into " + str(store) + " in 3 shards" in capsys.readouterr().out
    assert main(["info", str(store)]) == 0
    assert "shards: 3" in capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), "--memory", str(store), "--prompt", "def main(",
                 "--max-new-tokens", "3", "--explain"]) == 0
    assert "doc" in capsys.readouterr().out  # passages named by the document their shard holds
    assert main(["index", str(corpus), "--model", str(model_dir), "--out", str(tmp_path / "more"), "--shards", "4"]) == 2
    assert "4 shards need at least 4 documents, the corpus has 3" in capsys.readouterr().err


def test_generate_with_explain_names_stored_passages(model_dir, store, capsys):
    assert main(["generate", "--model", str(model_dir), "--memory", str(store), "--prompt", "def main(",
                 "--max-new-tokens", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "most attended stored passages" in out
    assert "doc" in out and "@ token" in out  # passages are named by document and position


def test_generate_matches_library_generation(model_dir, store, capsys):
    assert main(["generate", "--model", str(model_dir), "--memory", str(store), "--prompt", "import os",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    model = knnmem.LongLlamaForCausalLM.from_pretrained(model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer("import os")["input_ids"]])
    out = model.generate(ids, memory=knnmem.Memory.load(store, model=model), max_new_tokens=4, do_sample=False)
    assert printed == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_compare_writes_table_json_and_plots(model_dir, corpus, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["compare", "--model", str(model_dir), "--text", str(corpus / "doc0.txt"), "--index", "Flat",
                 "--index", "HNSW32", "--k", "4,64", "--codec", "float32", "--codec", "int8", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| dense | float32 | all | 1.000 |" in out
    rows = json.loads((report / "comparison.json").read_text())
    assert [(r["index"], r["codec"], r["k"]) for r in rows] == [("dense", "float32", None)] + [
        (spec, codec, k) for spec in ("Flat", "HNSW32") for codec in ("float32", "int8") for k in (4, 64)]
    flat4, flat64 = rows[1], rows[2]
    assert 0.8 < rows[3]["recall"] < 1  # int8 keys, judged by the uncompressed ones (k=4 of a sharp random model)
    assert flat4["recall"] > 0.99  # Flat is exact top-k
    assert flat64["output_rel_error"] < flat4["output_rel_error"]  # more entries, closer to dense
    assert (report / "recall_vs_speed.png").stat().st_size > 0 and (report / "error_vs_k.png").stat().st_size > 0


def test_passkey_reports_each_length_and_memory(model_dir, tmp_path, capsys):
    assert main(["passkey", "--model", str(model_dir), "--lengths", "160,200", "--exact-up-to", "160",
                 "--index", "Flat", "--trials", "2", "--report", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "passkey.json").read_text())
    assert [(r["length"], r["memory"]) for r in results] == [(160, "dense"), (160, "Flat"), (200, "Flat")]
    for r in results:  # every trial is on record, and the accuracy is theirs
        assert len(r["attempts"]) == 2 and all(0 <= a["depth"] <= 1 for a in r["attempts"])
        assert r["accuracy"] == sum(a["correct"] for a in r["attempts"]) / 2
    misses = [a for r in results for a in r["attempts"] if not a["correct"]]
    assert capsys.readouterr().out.count("missed: ") == len(misses)
    assert (tmp_path / "passkey.png").stat().st_size > 0


def test_passkey_merge_pools_the_trials_of_separate_runs(model_dir, tmp_path, capsys):
    for seed in (0, 1):
        assert main(["passkey", "--model", str(model_dir), "--lengths", "160,200", "--exact-up-to", "160", "--index",
                     "Flat", "--trials", "2", "--seed", str(seed), "--report", str(tmp_path / str(seed))]) == 0
    runs = [json.loads((tmp_path / str(seed) / "passkey.json").read_text()) for seed in (0, 1)]
    assert main(["passkey-merge", str(tmp_path / "0"), str(tmp_path / "1" / "passkey.json"),
                 "--report", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "passkey.json").read_text())
    assert [(r["length"], r["memory"], r["trials"]) for r in merged] == [
        (160, "dense", 4), (160, "Flat", 4), (200, "Flat", 4)]
    for row, first, second in zip(merged, *runs):
        assert row["attempts"] == first["attempts"] + second["attempts"]
        assert row["accuracy"] == sum(a["correct"] for a in row["attempts"]) / 4
        assert row["seconds_per_trial"] == pytest.approx(sum(a["seconds"] for a in row["attempts"]) / 4)
    assert (tmp_path / "all" / "passkey.png").stat().st_size > 0
    capsys.readouterr()

    assert main(["passkey-merge", str(tmp_path / "0"), str(tmp_path / "0")]) == 2  # the same trials twice
    assert "appears in two of the reports" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"length": 160, "memory": "Flat", "accuracy": 1.0}]))
    assert main(["passkey-merge", str(tmp_path / "bad.json")]) == 2
    assert "is not a pass-key report with every trial on record" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/store"], "not a knnmem store"),
        (["generate", "--model", "/no/such/model", "--memory", "x", "--prompt", "p"], "not a model directory"),
        (["passkey", "--model", "MODEL", "--index", "NoSuchIndex"], "unknown index spec"),
        (["generate", "--model", "MODEL", "--memory", "x", "--prompt", "p", "--chat"], "has no chat template"),
        (["index", "/no/such/corpus", "--model", "MODEL", "--out", "OUT"], "does not exist"),
        (["passkey", "--model", "MODEL", "--device", "gpu"], "unknown device 'gpu'"),
        (["passkey-merge", "/no/such/report"], "does not exist: expected a pass-key report"),
        (["compare", "--model", "MODEL", "--index", "Flat", "--text", "t", "--device", "cuda:99"], "is not available"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, model_dir, tmp_path, capsys):
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def bad_inputs(model_dir, store, tmp_path_factory):
    """Paths that the cases below name: a file, models that cannot load, a store missing a section, an empty text."""
    root = tmp_path_factory.mktemp("bad")
    (root / "file").write_text("x")
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (root / "garbage").mkdir()
    for file in model_dir.iterdir():
        (root / "garbage" / file.name).write_bytes(file.read_bytes())
    (root / "garbage" / "model.safetensors").write_bytes(b"\x10" * 1000)
    (root / "store").mkdir()
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["options"]
    manifest["checksum"] = checksum(manifest)
    (root / "store" / "manifest.json").write_text(json.dumps(manifest))
    (root / "empty.txt").write_text("")
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "CORPUS", "--model", "MODEL", "--out", "BAD/file"], "file: is a file, not a directory"),
        (["index", "CORPUS", "--model", "MODEL", "--out", "BAD/file/store"], "(cannot create "),
        (["index", "CORPUS", "--model", "MODEL", "--out", "BAD"], "not a knnmem store and not empty"),
        (["passkey", "--model", "MODEL", "--device", "meta"], "device 'meta' is not available here"),
        (["passkey", "--model", "MODEL", "--device", "mps"], "device 'mps' is not available here"),
        (["passkey", "--model", "BAD/config-only"], "config-only: cannot load the model (OSError"),
        (["passkey", "--model", "BAD/garbage"], "garbage: cannot load the model"),
        (["index", "CORPUS", "--model", "MODEL", "--out", "OUT", "--index", "IDMap,Flat"], "drop IDMap"),
        (["index", "CORPUS", "--model", "MODEL", "--out", "OUT", "--index", "HNSW0"], "must be positive"),
        (["info", "BAD/store"], "manifest.json: field 'options' must be"),
        (["passkey", "--model", "MODEL", "--lengths", "10", "--index", "Flat"], "lengths [10] are shorter than"),
        (["compare", "--model", "MODEL", "--index", "Flat", "--text", "BAD/empty.txt"], "empty.txt: empty"),
    ],
)
def test_more_bad_input_is_one_clear_line(argv, message, model_dir, corpus, bad_inputs, tmp_path, capsys):
    names = {"MODEL": str(model_dir), "CORPUS": str(corpus), "OUT": str(tmp_path / "o")}
    argv = [names.get(a, a.replace("BAD", str(bad_inputs))) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--lengths", "inf"], ["--lengths", "1e400"], ["--lengths", ",,"],
                                  ["--exact-up-to", "inf"], ["--lengths", "nan"]])
def test_token_counts_that_are_not_counts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", "--model", "/no/such/model", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: expected" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--trials", "--k"])
def test_counts_below_one_are_refused_before_any_work(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["passkey", "--model", "/no/such/model", option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected a positive integer, got '0'" in capsys.readouterr().err


def test_store_of_another_model_is_refused(store, model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    model = knnmem.LongLlamaForCausalLM.from_pretrained(model_dir)
    sharp_model(model.config, seed=5).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (other / name).write_bytes((model_dir / name).read_bytes())
    assert main(["generate", "--model", str(other), "--memory", str(store), "--prompt", "x"]) == 2
    assert "different model" in capsys.readouterr().err


def test_token_counts_parse():
    assert parse_tokens("4k") == 4096 and parse_tokens("1M") == 1 << 20 and parse_tokens("300") == 300
    with pytest.raises(Exception, match="token count"):
        parse_tokens("lots")
