"""`knnmem serve` under load over loopback: time to first token and tokens/s at each number of concurrent clients.

Starts the server as a subprocess, sends `--requests` requests per level of `--clients` (half streamed,
a `--malformed` share of them broken on purpose), and prints one Markdown row per level. Then checks:
no 5xx at all, every malformed request answered 4xx, resident memory after `--rss-requests` more
requests against what it was after warm-up, greedy answers equal to `knnmem generate` for the same
prompts, and the same answers again after the server is killed with SIGKILL and restarted.

    python benchmarks/serve_bench.py --memory demo=indexes/demo-smollm2 --requests 40 --max-tokens 4
    python benchmarks/serve_bench.py --model model/tiny --memory demo=indexes/demo --requests 200 --rss-requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

QUESTIONS = Path(__file__).resolve().parent.parent / "knnmem" / "eval" / "demo_data" / "questions.jsonl"
# Each is refused by validation before the model runs; which one a request gets cycles through the list.
MALFORMED = [
    b"{not json",
    b'{"model": "MODEL", "messages": "hello"}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}',
    b'{"model": "nothing+here", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "best_of": 3}',
]


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "knnmem.cli", "serve", "--port", "0", "--max-queue", "64",
               "--max-tokens", str(args.max_tokens), "--device", args.device]
    command += ["--model", args.model] if args.model else []
    for memory in args.memory:
        command += ["--memory", memory]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = ""
    while "models" not in printed:
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"the server did not start:\n{printed}")
        printed += line
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process, re.search(r"http://[\d.]+:\d+", printed).group(0)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, args, questions) -> dict:
    """Request number `i`: malformed every 1/malformed-th time, else a question, streamed every other time."""
    every = round(1 / args.malformed) if args.malformed else 0
    started = time.perf_counter()
    if every and i % every == every - 1:
        body = MALFORMED[(i // every) % len(MALFORMED)].replace(b"MODEL", model.encode())
        response = await client.post(url + "/v1/chat/completions", content=body,
                                     headers={"content-type": "application/json"})
        return {"malformed": True, "status": response.status_code}
    body = {"model": model, "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            "max_tokens": args.max_tokens, "temperature": 0}
    if i % 2:
        first, tokens = None, 0
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        done = time.perf_counter() - started
        return {"malformed": False, "status": response.status_code, "stream": True, "ttft": first or done,
                "latency": done, "tokens": tokens}
    response = await client.post(url + "/v1/chat/completions", json=body)
    done = time.perf_counter() - started
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return {"malformed": False, "status": response.status_code, "stream": False, "ttft": done, "latency": done,
            "tokens": tokens}


async def level(url: str, model: str, clients: int, requests: int, args, questions, offset: int = 0) -> tuple[list, float]:
    """`requests` requests from `clients` concurrent clients; their results and the wall time."""
    todo = iter(range(offset, offset + requests))
    results = []

    async def worker(client):
        for i in todo:
            results.append(await one_request(client, url, model, i, args, questions))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return results, time.perf_counter() - started


def greedy_answers(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    answers = []
    for prompt in prompts:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        answers.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
                       ["choices"][0]["message"]["content"])
    return answers


def generate_answers(args, store: str, prompts: list[str]) -> list[str]:
    answers = []
    for prompt in prompts:
        command = [sys.executable, "-m", "knnmem.cli", "generate", "--memory", store, "--prompt", prompt,
                   "--max-new-tokens", str(args.max_tokens), "--device", args.device]
        command += ["--model", args.model] if args.model else []
        answers.append(subprocess.run(command, capture_output=True, text=True, check=True).stdout.removesuffix("\n"))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="as `knnmem serve --model` (default: the default model)")
    parser.add_argument("--memory", action="append", required=True, help="NAME=STORE; the first is queried")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=200, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.2, help="share of malformed requests")
    parser.add_argument("--rss-requests", type=int, default=0, help="requests after the levels, watching memory")
    parser.add_argument("--checks", type=int, default=3, help="prompts compared with knnmem generate and a restart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()

    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()]
    name, store = args.memory[0].split("=", 1)
    process, url = start_server(args)
    model = f"{httpx.get(url + '/health').json()['model']}+{name}"
    lines = [f"`{' '.join(sys.argv)}`", "",
             "| clients | requests | malformed | streamed | 5xx | malformed answered 4xx | TTFT p50 s | TTFT p99 s "
             "| latency p50 s | latency p99 s | tokens/s |", "|" + "---|" * 11]
    try:
        asyncio.run(level(url, model, 1, 2, argparse.Namespace(**{**vars(args), "malformed": 0}), questions))
        warm_rss = rss_mib(process.pid)
        served = 0
        for clients in (int(c) for c in args.clients.split(",")):
            results, wall = asyncio.run(level(url, model, clients, args.requests, args, questions, offset=served))
            served += args.requests
            valid = [r for r in results if not r["malformed"]]
            bad = [r for r in results if r["malformed"]]
            streamed = [r for r in valid if r["stream"]]
            lines.append(
                f"| {clients} | {len(results)} | {len(bad)} | {len(streamed)} | "
                f"{sum(r['status'] >= 500 for r in results)} | {sum(400 <= r['status'] < 500 for r in bad)}/{len(bad)} | "
                f"{percentile([r['ttft'] for r in streamed], 0.5):.2f} | {percentile([r['ttft'] for r in streamed], 0.99):.2f} | "
                f"{percentile([r['latency'] for r in valid], 0.5):.2f} | {percentile([r['latency'] for r in valid], 0.99):.2f} | "
                f"{sum(r['tokens'] for r in valid) / wall:.1f} |")
            print(lines[-1], flush=True)
        if args.rss_requests:
            samples = []
            for start in range(0, args.rss_requests, max(args.rss_requests // 10, 1)):
                count = min(max(args.rss_requests // 10, 1), args.rss_requests - start)
                results, _ = asyncio.run(level(url, model, 4, count, args, questions, offset=served))
                served += count
                assert not any(r["status"] >= 500 for r in results)
                samples.append(rss_mib(process.pid))
            lines += ["", f"resident memory after warm-up {warm_rss:.0f} MiB; after each tenth of {args.rss_requests} more "
                      f"requests (4 clients): {', '.join(f'{s:.0f}' for s in samples)} MiB "
                      f"(last minus first tenth: {samples[-1] - samples[0]:+.0f} MiB)"]
        prompts = questions[: args.checks]
        served_answers = greedy_answers(url, model, prompts, args.max_tokens)
        generated = generate_answers(args, store, prompts)
        lines.append(f"greedy answers equal to `knnmem generate`: {sum(a == b for a, b in zip(served_answers, generated))}"
                     f"/{len(prompts)}")
        process.send_signal(signal.SIGKILL)
        process.wait()
        process, url = start_server(args)
        again = greedy_answers(url, model, prompts, args.max_tokens)
        lines.append(f"after kill -9 and a restart, the same answers: {sum(a == b for a, b in zip(served_answers, again))}"
                     f"/{len(prompts)}")
        print("\n".join(lines[-2:]))
        print("example answer: " + json.dumps({"prompt": prompts[0], "answer": served_answers[0]}))
    finally:
        process.terminate()
        process.wait(timeout=60)
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
