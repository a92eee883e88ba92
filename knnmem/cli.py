"""The `knnmem` command line: thin wrappers over library functions, one subcommand each."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
import warnings
from pathlib import Path


MODEL_HELP = ("model directory, .gguf file, adapter directory or hub id (default: SmolLM2-135M-Instruct with "
              "the memory adapter model/smollm2)")


class UsageError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` option per field of the dataclass `cls`, typed from its annotations."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = {bool: _parse_bool, int: int, float: float, str: str}.get(hint)
        if kind is None:
            kind = _parse_int_list if "list" in str(hint) else str
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            help=f"(default: {default})")


def parse_positive(text: str) -> int:
    """A count that must be at least 1 (trials, k, new tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_tokens(text: str) -> int:
    """'4096', '4k' (4096) or '1M' (1048576) as a number of tokens."""
    units = {"k": 1 << 10, "m": 1 << 20}
    body, unit = (text[:-1], units[text[-1].lower()]) if text and text[-1].lower() in units else (text, 1)
    try:
        value = int(float(body) * unit)
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise argparse.ArgumentTypeError(f"expected a token count like 4096, 4k or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return value


def parse_token_list(text: str) -> list[int]:
    counts = [parse_tokens(part.strip()) for part in text.split(",") if part.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts like 4k,16k, got {text!r}")
    return counts


def load_model(args):
    """The model and tokenizer of `args.model` on `args.device`; `UsageError` saying why they cannot be loaded."""
    import torch

    from .model import load_pretrained, pick_device

    usable = {"cpu", "cuda"} | ({"mps"} if torch.backends.mps.is_available() else set())
    if pick_device(args.device).type not in usable:
        raise UsageError(f"device {args.device!r} is not available here: use auto, cpu, cuda or cuda:N")
    try:
        return load_pretrained(args.model, args.device)
    # Whatever a directory of the wrong files makes transformers or safetensors raise.
    except Exception as error:  # noqa: BLE001
        reason = (str(error).strip().splitlines() or [""])[0]
        raise UsageError(f"{args.model}: cannot load the model ({type(error).__name__}: {reason})") from None


def cmd_index(args) -> None:
    from .ingest import index_corpus
    from .memory import check_spec
    from .store.format import check_target

    sharded = args.shards > 1 or args.ray
    check_target(args.out, sharded=sharded)  # before the model runs
    model, tokenizer = load_model(args)
    spec = check_spec(args.index, model.config.head_dim)
    memory = index_corpus(model, tokenizer, args.corpus, path=args.out, index=spec, k=args.k, codec=args.codec,
                          keep_keys=args.keep_keys, include=args.include, text_field=args.text_field,
                          shards=args.shards, ray=args.ray)
    shards = f" in {args.shards} shards" if sharded else ""
    print(f"indexed {len(memory.documents)} documents, {len(memory):,} tokens into {args.out}{shards} "
          f"({args.index}, k={args.k}, codec {memory.codec})")


def cmd_generate(args) -> None:
    from .chat import encode_prompt
    from .decoding import Sampling, generate
    from .eval.explain import explain_generation
    from .memory import Memory

    model, tokenizer = load_model(args)
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    memory = Memory.load(args.memory, model=model)
    if args.k:
        memory.k = args.k
    if not args.explain:
        print(generate(model, tokenizer, memory, ids, Sampling(max_new_tokens=args.max_new_tokens)).text)
        return
    explanation = explain_generation(model, tokenizer, memory, ids, max_new_tokens=args.max_new_tokens)
    print(explanation.answer)
    print("\nmost attended stored passages over the answer:")
    for p in explanation.overall:
        print(f"  {p.weight:.3f}  {p.document} @ token {p.position}: {p.text}")
    print("\nper generated token (top passage):")
    for token, passages in zip(explanation.tokens, explanation.per_token):
        top = passages[0] if passages else None
        where = f"{top.document} @ {top.position}: {top.text}" if top else "(no memory)"
        print(f"  {token!r:>10}  {top.weight if top else 0:.3f}  {where}")


def parse_memory(text: str) -> tuple[str, str]:
    """'NAME=STORE' or 'STORE' (named after its directory) as (name, store)."""
    name, sep, store = text.partition("=")
    if not sep or "/" in name:  # a path that merely contains '='
        name, store = Path(text.rstrip("/")).name, text
    if not name or "+" in name:
        raise argparse.ArgumentTypeError(f"memory names must be non-empty and without '+', got {text!r}")
    return name, store


def cmd_serve(args) -> None:
    from .memory import Memory
    from .serve import Engine, Limits, model_name, run_server

    names = [name for name, _ in args.memory]
    if len(set(names)) < len(names):
        raise UsageError(f"memory names must differ, got {names}: name them with --memory NAME=STORE")
    model, tokenizer = load_model(args)
    memories = {}
    try:
        for name, store in args.memory:
            memories[name] = Memory.load(store, model=model)
        engine = Engine(model, tokenizer, memories, name=model_name(args.model),
                        limits=Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens))
        engine.warm_up()
        run_server(engine, host=args.host, port=args.port, workers=args.workers, max_queue=args.max_queue,
                   api_key=args.api_key, shutdown_timeout=args.shutdown_timeout)
    finally:
        for memory in memories.values():
            memory.close()


def cmd_migrate(args) -> None:
    from .store.format import migrate_store

    manifest = migrate_store(args.store)
    print(f"migrated {args.store} to store format {manifest['format_version']} ({manifest['entries']:,} entries, "
          "data files unchanged)")


def cmd_info(args) -> None:
    from .store import read_manifest
    from .store.manifest import is_sharded

    manifest = read_manifest(args.store)
    fields = ("format_version", "kind", "generation", "index", "k", "layers", "num_heads", "head_dim", "dtype",
              "entries")
    for field in fields:
        if field in manifest:
            print(f"{field:>15}: {manifest[field]}")
    print(f"{'codec':>15}: {manifest.get('codec', manifest['dtype'])}")  # stores without one cast to their dtype
    if is_sharded(manifest):
        print(f"{'shards':>15}: {len(manifest['shards'])} (`knnmem info` on a shard directory describes it)")
        for shard in manifest["shards"]:
            print(f"  {shard['name']}  {shard['entries']:>11,} entries  {shard['documents']:>6,} documents")
        return
    print(f"{'options':>15}: {manifest['options']}")
    for layer, heads in manifest.get("ivf_outliers", {}).items():
        if any(head["radius"] is not None for head in heads):  # the lists are trained
            counts = [len(head["ids"]) for head in heads]
            share = 100 * max(counts) / max(manifest["entries"], 1)
            print(f"{'scored exactly':>15}: layer {layer}: {min(counts):,}-{max(counts):,} entries per head beyond "
                  f"the lists or their codes (at most {share:.2f}% of entries)")
    for layer, count in manifest.get("exact_values", {}).items():
        share = 100 * count / max(manifest["entries"] * manifest["num_heads"], 1)
        print(f"{'kept exactly':>15}: layer {layer}: {count:,} values beside their codes ({share:.2f}% of values)")
    sizes = sum(record["bytes"] for record in manifest["files"].values())
    print(f"{'bytes on disk':>15}: {sizes:,} ({sizes / max(manifest['entries'], 1):,.0f} per token)")
    print(f"{'documents':>15}: {len(manifest['documents'])}")
    for doc in manifest["documents"][: args.documents]:
        print(f"  #{doc['id']:<5} {doc['end'] - doc['start']:>9,} tokens  {doc['name']}")
    if len(manifest["documents"]) > args.documents:
        print(f"  ... {len(manifest['documents']) - args.documents} more")


def cmd_compare(args) -> None:
    import torch

    from .eval.compare import compare_memories, markdown_table, write_report
    from .memory import Memory, check_spec

    model, tokenizer = load_model(args)
    specs = [check_spec(s, model.config.head_dim) for s in args.index]
    base = Memory.load(args.memory, model=model) if args.memory else None
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise UsageError(f"{args.text}: empty: give a file with text for the model to read")
    elif base is not None:
        text = args.queries
    else:
        raise UsageError("give --text FILE (read with each memory) or --memory STORE")
    ids = tokenizer(text)["input_ids"][: args.max_tokens]
    rows = compare_memories(model, torch.tensor([ids]), specs, ks=args.k, base=base, codecs=args.codec or [None],
                            keep_keys=args.keep_keys)
    print(markdown_table(rows))
    if args.report:
        for path in write_report(rows, args.report):
            print(f"wrote {path}")


def cmd_passkey(args) -> None:
    from .eval.passkey import passkey_sweep
    from .memory import check_spec

    model, tokenizer = load_model(args)
    spec = check_spec(args.index, model.config.head_dim)
    results = passkey_sweep(model, tokenizer, args.lengths, index=spec, k=args.k, exact_up_to=args.exact_up_to,
                            trials=args.trials, seed=args.seed, codec=args.codec, keep_keys=args.keep_keys)
    _print_passkey(results, args.report)


def cmd_passkey_merge(args) -> None:
    from .eval.passkey import merge_results, read_report

    _print_passkey(merge_results([r for path in args.reports for r in read_report(path)]), args.report)


def _print_passkey(results, report) -> None:
    from .eval.passkey import passkey_misses, passkey_table, write_report

    print("\n".join([passkey_table(results), *passkey_misses(results)]))
    if report:
        print("wrote " + " and ".join(str(path) for path in write_report(results, report)))


def cmd_demo(args) -> None:
    from .eval.demo import run_demo
    from .memory import check_spec
    from .store.format import check_target

    check_target(args.out)
    model, tokenizer = load_model(args)
    index = check_spec(args.index, model.config.head_dim)
    run_demo(model, tokenizer, args.out, index=index, k=args.k, limit=args.questions, report=args.report)


def cmd_train(args) -> None:
    from .train.trainer import TrainConfig, train

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**fields)
    except ValueError as e:
        raise UsageError(str(e)) from None
    train(config, args.out)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="where the model and memory run: auto (CUDA where available), "
                   "cpu, cuda or cuda:N; Faiss indexes stay on the CPU unless faiss-gpu is installed")


def build_parser() -> argparse.ArgumentParser:
    from .memory import DEFAULT_INDEX, DEFAULT_K
    from .train.trainer import TrainConfig

    parser = argparse.ArgumentParser(prog="knnmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="encode a corpus into a memory store")
    p.add_argument("corpus", nargs="+", help="text files, folders of them, or JSONL files")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="store directory to write, e.g. indexes/NAME")
    p.add_argument("--index", default=DEFAULT_INDEX, help=f"dense, torch or a Faiss factory string (default {DEFAULT_INDEX})")
    p.add_argument("--k", type=parse_positive, default=DEFAULT_K, help=f"entries retrieved per query and head (default {DEFAULT_K})")
    p.add_argument("--codec", default=None, help="how keys and values are stored: float32, bfloat16, float16, int8, "
                   "or KEYS/VALUES such as int8/pq8 (default: the model's memory dtype)")
    p.add_argument("--keep-keys", type=_parse_bool, default=True,
                   help="keep full keys beside the index (needed to re-index; default true)")
    p.add_argument("--include", default="*.txt", help="file pattern inside folders (default *.txt)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--shards", type=parse_positive, default=1,
                   help="write a sharded store: the documents cut into this many ranges, one store each (default 1)")
    p.add_argument("--ray", action="store_true", help="encode the shards in parallel Ray tasks, one model replica "
                   "each (joins the cluster of RAY_ADDRESS, else starts a local one; needs knnmem[ray])")
    _add_device(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("generate", help="generate from a prompt with a stored memory")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--memory", required=True, help="store directory written by `knnmem index`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=parse_positive, default=32)
    p.add_argument("--k", type=parse_positive, default=None, help="override the store's k")
    p.add_argument("--explain", action="store_true", help="list the stored passages the memory layers attended to")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt as a user turn of the tokenizer's chat template (default: when it has one)")
    _add_device(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server answering from stored memories")
    p.add_argument("--memory", action="append", required=True, type=parse_memory, metavar="[NAME=]STORE",
                   help="store to answer from, requested as model MODEL+NAME (repeatable; NAME: the directory's name)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--api-key", default=os.environ.get("KNNMEM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $KNNMEM_API_KEY)")
    p.add_argument("--workers", type=parse_positive, default=1, help="generations run at once (default 1)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond those; more are answered 429 "
                   "(default 16)")
    p.add_argument("--max-prompt-tokens", type=parse_tokens, default=8192, help="longest prompt (default 8192)")
    p.add_argument("--max-tokens", type=parse_positive, default=256, help="longest answer (default 256)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running generations may take to finish after SIGTERM before they are cancelled")
    _add_device(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compare", help="exact dense memory against index specs on the same input")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--memory", help="store whose entries every memory starts with")
    p.add_argument("--text", help="text file the model reads with each memory")
    p.add_argument("--queries", default="What is the pass key? The pass key is",
                   help="text read against --memory when no --text is given")
    p.add_argument("--index", action="append", required=True, help="index spec to compare (repeatable)")
    p.add_argument("--k", type=_parse_int_list, default=[DEFAULT_K], help="k values, comma-separated")
    p.add_argument("--codec", action="append", help="codec each index spec is also compared with, e.g. int8 or "
                   "int8/pq8 (repeatable; default: the model's memory dtype)")
    p.add_argument("--keep-keys", type=_parse_bool, default=True, help="Faiss memories keep full keys (default true)")
    p.add_argument("--max-tokens", type=parse_tokens, default=1 << 16, help="read at most this many tokens")
    p.add_argument("--report", help="directory for comparison.json and plots")
    _add_device(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("passkey", help="pass-key retrieval accuracy per prompt length")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--lengths", type=parse_token_list, default=parse_token_list("4k,16k,64k"))
    p.add_argument("--index", default=DEFAULT_INDEX)
    p.add_argument("--k", type=parse_positive, default=DEFAULT_K)
    p.add_argument("--exact-up-to", type=parse_tokens, default=1 << 16, help="also run dense memory up to this length")
    p.add_argument("--trials", type=parse_positive, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default=None, help="how the index's memory stores keys and values, as for `knnmem index`")
    p.add_argument("--keep-keys", type=_parse_bool, default=True, help="the index's memory keeps full keys (default true)")
    p.add_argument("--report", help="directory for passkey.json and passkey.png")
    _add_device(p)
    p.set_defaults(func=cmd_passkey)

    p = sub.add_parser("passkey-merge", help="pool the trials of pass-key reports of separate runs (seeds, machines)")
    p.add_argument("reports", nargs="+", help="report directories (or passkey.json files) of `knnmem passkey`")
    p.add_argument("--report", help="directory for the pooled passkey.json and passkey.png")
    p.set_defaults(func=cmd_passkey_merge)

    p = sub.add_parser("migrate", help="rewrite the manifest of a format-1 store in the current format")
    p.add_argument("store")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("info", help="describe a memory store")
    p.add_argument("store")
    p.add_argument("--documents", type=int, default=20, help="documents to list")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="index the embedded corpus, reload it and answer questions from it")
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--out", default="indexes/demo", help="store directory (default indexes/demo)")
    p.add_argument("--index", default=DEFAULT_INDEX)
    p.add_argument("--k", type=parse_positive, default=DEFAULT_K)
    p.add_argument("--questions", type=parse_positive, default=None, help="ask only the first N questions")
    p.add_argument("--report", default=None, help="also write every answer to this JSON file")
    _add_device(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a LongLLaMA model with FoT cross-batch attention (resumable)")
    p.add_argument("--out", required=True, help="run directory: tokenizer, checkpoint, metrics, loss plot")
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()  # weight loading takes a moment; its bar would only clutter the output
    # Warnings (such as skipped corpus files) as one line each, like errors, without the source line.
    warnings.formatwarning = lambda message, *_: f"knnmem {args.command}: warning: {message}\n"
    try:
        args.func(args)
    except (UsageError, OSError, ValueError) as e:  # StoreError is a ValueError
        print(f"knnmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
