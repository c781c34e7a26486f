"""Throughput of the pricing core and of ``billing quote --batch``, against a JSON round trip.

Measures, in one run, on one core (the process and its subprocesses are pinned to one CPU):

* ``quote(request, book)`` over pre-parsed request dicts, and ``parse_usage`` +
  ``compute_cost`` alone with each model's pricing looked up once (goal: >= 100,000 /s);
* ``run_batch`` in-process and ``billing quote --batch`` as a subprocess over N JSON lines
  (goal: >= 20,000 lines/s), plus the start-up time of a 1-line run;
* the reference over the SAME lines: ``json.loads(line, parse_float=Decimal)`` +
  ``json.dumps(obj, default=str)`` (the Decimals need ``default``) in-process, and the same
  loop as a ``python -c`` subprocess.

The lines are generated here from a seeded RNG (OpenRouter/OpenAI chat, Responses, Anthropic
with 5m/1h cache writes, Gemini usageMetadata; cached and reasoning tokens, >200k tiers, web
search, reported cost). Each figure is the best of 3 runs.

    .venv/bin/python bench/quote.py             # N = 200,000 lines
    .venv/bin/python bench/quote.py --quick     # smoke run (N = 2,000)
    .venv/bin/python bench/quote.py --lines 50000 --profile   # + cProfile of quote()
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.cli.main import run_batch
from services.core.catalogue import apply_catalogue, default_catalogue
from services.core.cost import compute_cost
from services.core.pricebook import InMemoryPriceBook
from services.core.quote import quote
from services.core.usage import parse_usage

REPEAT = 3
REFERENCE_CODE = (
    "import json, sys\nfrom decimal import Decimal\nw = sys.stdout.write\n"
    "for line in sys.stdin:\n"
    "    w(json.dumps(json.loads(line, parse_float=Decimal), default=str)); w('\\n')\n"
)
CHAT = ["openai/gpt-5", "openai/gpt-5-mini", "openai/gpt-4.1", "openai/gpt-4o-mini",
        "anthropic/claude-sonnet-4.5", "deepseek/deepseek-chat-v3.1",
        "meta-llama/llama-3.3-70b-instruct", "anthropic/claude-sonnet-4-5"]  # fmt: skip
CLAUDE = ["anthropic/claude-sonnet-4.5", "anthropic/claude-haiku-4.5", "anthropic/claude-opus-4.1"]


def make_line(rng: random.Random) -> dict[str, Any]:
    """One quote request in a random wire format, with realistic token counts."""
    kind, big = rng.random(), rng.random() < 0.05  # 5% above the 200k long-context tier
    prompt = rng.randint(200_001, 400_000) if big else rng.randint(50, 40_000)
    out = rng.randint(1, 4_000)
    think = rng.randint(0, out) if rng.random() < 0.4 else 0
    cached = rng.randint(0, prompt) if rng.random() < 0.5 else 0
    if kind < 0.40:  # OpenRouter / OpenAI Chat Completions
        model = "anthropic/claude-sonnet-4.5" if big else rng.choice(CHAT)
        u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": out,
                             "total_tokens": prompt + out,
                             "prompt_tokens_details": {"cached_tokens": cached},
                             "completion_tokens_details": {"reasoning_tokens": think}}  # fmt: skip
        if rng.random() < 0.1:
            u["server_tool_use_details"] = {"web_search_requests": rng.randint(1, 3)}
        if rng.random() < 0.5:
            u["cost"] = rng.randint(1, 10**6) / 10**7  # a JSON number, read as Decimal
            u["is_byok"] = False
        return {"provider_model_id": model, "usage": u} | ({"format": "openai"} if big else {})
    if kind < 0.55:  # OpenAI Responses API
        u = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
             "output_tokens": out, "output_tokens_details": {"reasoning_tokens": think},
             "total_tokens": prompt + out}  # fmt: skip
        model = rng.choice(["openai/gpt-5", "openai/gpt-5-mini", "openai/gpt-4.1"])
        return {"provider_model_id": model, "usage": u, "format": "openai_responses"}
    if kind < 0.80:  # Anthropic Messages: input_tokens exclude cache reads and writes
        w5, w1 = rng.choice([0, rng.randint(1, 5_000)]), rng.choice([0, 0, rng.randint(1, 9_000)])
        u = {"input_tokens": prompt, "cache_read_input_tokens": cached,
             "cache_creation_input_tokens": w5 + w1,
             "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
             "output_tokens": out}  # fmt: skip
        if rng.random() < 0.1:
            u["server_tool_use"] = {"web_search_requests": rng.randint(1, 3)}
        model = "anthropic/claude-sonnet-4.5" if big else rng.choice(CLAUDE)
        return {"provider_model_id": model, "usage": u, "format": "anthropic"}
    meta = {"promptTokenCount": prompt, "cachedContentTokenCount": cached,
            "candidatesTokenCount": out, "thoughtsTokenCount": think,
            "totalTokenCount": prompt + out + think}  # fmt: skip
    model = "google/gemini-2.5-pro" if big or rng.random() < 0.3 else "google/gemini-2.5-flash"
    return {"provider_model_id": model, "usage": {"usageMetadata": meta}}


def best(fn: Callable[[], object]) -> float:
    """Best wall time of ``REPEAT`` calls, in seconds."""
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(cmd: list[str], stdin: Path, env: dict[str, str], cpu: int | None) -> Callable[[], None]:
    """A callable that runs ``cmd`` pinned to ``cpu``, stdin from a file, and checks it."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
    preexec = None if pin or cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))

    def go() -> None:
        with stdin.open("rb") as src, tempfile.TemporaryFile() as dst:
            subprocess.run(
                pin + cmd, stdin=src, stdout=dst, env=env, check=True, preexec_fn=preexec
            )

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000, help="lines / requests (200,000)")
    ap.add_argument("--quick", action="store_true", help="smoke run with 2,000 lines")
    ap.add_argument("--profile", action="store_true", help="also cProfile quote() (top 15)")
    args = ap.parse_args()
    n = 2_000 if args.quick else args.lines
    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else None
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    rng = random.Random(20250929)
    text = "".join(json.dumps(make_line(rng)) + "\n" for _ in range(n))
    lines = text.splitlines(keepends=True)
    requests = [json.loads(line, parse_float=Decimal) for line in lines]
    book = InMemoryPriceBook()
    apply_catalogue(
        book, default_catalogue(), observed_at=datetime(2025, 1, 1, tzinfo=UTC), source="snapshot"
    )
    now = datetime.now(UTC)
    pricing = {m: book.lookup(m).pricing for m in {r["provider_model_id"] for r in requests}}
    triples = [(r["usage"], r.get("format"), pricing[r["provider_model_id"]]) for r in requests]
    data = text.encode()
    sink = io.BytesIO()
    if run_batch(io.BytesIO(data), sink, book) or sink.getvalue().count(b"\n") != n:
        raise SystemExit("every generated line must price without error")

    def core() -> None:
        for r in requests:
            quote(r, book)

    def core_parts() -> None:
        for usage, fmt, prices in triples:
            compute_cost(parse_usage(usage, fmt).usage, prices, at=now)

    def reference() -> None:
        out = io.StringIO()
        for line in lines:
            out.write(json.dumps(json.loads(line, parse_float=Decimal), default=str))
            out.write("\n")

    t_ref = best(reference)
    t_core, t_parts = best(core), best(core_parts)
    t_batch = best(lambda: run_batch(io.BytesIO(data), io.BytesIO(), book))

    billing = Path(sys.executable).parent / "billing"
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"BILLING_DATA_DIR": tmp}
        big_in, one_in = Path(tmp, "lines.jsonl"), Path(tmp, "one.jsonl")
        big_in.write_text(text)
        one_in.write_text(lines[0])
        cli, ref = [str(billing), "quote", "--batch"], [sys.executable, "-c", REFERENCE_CODE]
        run(cli, one_in, env, cpu)()  # seeds the price book file, warms the OS caches
        t_cli_1, t_ref_1 = best(run(cli, one_in, env, cpu)), best(run(ref, one_in, env, cpu))
        t_cli, t_ref_sub = best(run(cli, big_in, env, cpu)), best(run(ref, big_in, env, cpu))

    rows = [  # (what, project, reference, unit, goal)
        ("quote() on pre-parsed dicts", n / t_core, n / t_ref, "/s", 100_000),
        ("parse_usage + compute_cost", n / t_parts, n / t_ref, "/s", 100_000),
        ("run_batch, in-process", n / t_batch, n / t_ref, "lines/s", 20_000),
        ("billing quote --batch, subprocess", n / t_cli, n / t_ref_sub, "lines/s", 20_000),
        ("start-up: subprocess over 1 line", t_cli_1 * 1e3, t_ref_1 * 1e3, "ms", None),
    ]
    print(
        f"Python {platform.python_version()} ({sys.executable}), os.cpu_count()={os.cpu_count()}"
        f", pinned to CPU {cpu}; N={n:,} lines; best of {REPEAT} runs, time.perf_counter"
    )
    print("reference = json.loads(line, parse_float=Decimal) + json.dumps(obj, default=str)")
    print("  over the same lines: in-process for rows 1-3, `python -c` subprocess for rows 4-5\n")
    head = f"{'measurement':<36} {'project':>12} {'reference':>12} {'ratio':>6}  {'unit':<8} goal"
    print(head + "\n" + "-" * len(head))
    for what, ours, theirs, unit, goal in rows:
        verdict = "" if goal is None else f">= {goal:,} " + ("met" if ours >= goal else "MISSED")
        print(
            f"{what:<36} {ours:>12,.0f} {theirs:>12,.0f} {ours / theirs:>6.2f}  {unit:<8} {verdict}"
        )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(core)
        print(f"\ncProfile of quote() over {n:,} requests, top 15 by tottime:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
