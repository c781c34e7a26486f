"""CPU of following a streamed answer for billing, beside parsing every line of it.

The gateway passes each SSE chunk of a streamed completion through ``capture.StreamReader``
to find the usage (and, only when there is none, the generated text to estimate from). This
measures, on the same streams in one run, the reader against the reference it replaced:
``json.loads(line, parse_float=Decimal)`` of every data line as it passes, observed into a
``capture.Seen``. Streams have the fake upstream's shape (a role chunk, N content chunks of a
token each, the usage chunk, ``[DONE]``), fed in network-sized pieces; each figure is the
best of 5 rounds. The usage the two find is compared on every stream.

    .venv/bin/python bench/stream_reader.py             # N = 24 and 1,000 tokens
    .venv/bin/python bench/stream_reader.py --tokens 24 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time
from decimal import Decimal
from typing import Any

from services.gateway.capture import OPENAI, Seen, StreamReader

USAGE = b'{"prompt_tokens":35,"completion_tokens":%d,"total_tokens":%d,"cost":0.0000195}'


def stream(tokens: int) -> list[bytes]:
    """One streamed answer, cut in pieces of about 1.4 kB (what a socket read gives)."""

    def chunk(delta: dict[str, Any]) -> bytes:
        document = {"id": "gen-1", "object": "chat.completion.chunk", "model": "openai/gpt-4o",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        return b"data: " + json.dumps(document).encode() + b"\n\n"

    lines = [chunk({"role": "assistant", "content": ""})]
    lines += [chunk({"content": f"tok{i} "}) for i in range(tokens)]
    usage = USAGE % (tokens, tokens + 35)
    lines.append(b'data: {"id":"gen-1","choices":[],"usage":' + usage + b"}\n\n")
    lines.append(b"data: [DONE]\n\n")
    whole = b"".join(lines)
    return [whole[at : at + 1400] for at in range(0, len(whole), 1400)]


def with_reader(pieces: list[bytes]) -> Any:
    reader = StreamReader(OPENAI)
    for piece in pieces:
        reader.feed(piece)
    reader.end()
    return reader.seen.usage


def every_line(pieces: list[bytes]) -> Any:
    """The reference: each data line parsed exactly as it passes."""
    seen, tail = Seen(), b""
    for piece in pieces:
        tail += piece
        *lines, tail = tail.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                document = json.loads(line[5:], parse_float=Decimal)
                if isinstance(document, dict):
                    seen.observe(OPENAI, document)
    return seen.usage


def best(function: Any, pieces: list[bytes], rounds: int, n: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            function(pieces)
        times.append((time.perf_counter() - started) / n)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[24, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'stream':<24}{'reader µs':>11}{'every line µs':>15}{'ratio':>7}")
    for tokens in args.tokens:
        pieces = stream(tokens)
        assert with_reader(pieces) == every_line(pieces)  # noqa: S101  # the same usage
        n = max(20, 60_000 // (tokens + 2))
        mine = best(with_reader, pieces, args.rounds, n)
        reference = best(every_line, pieces, args.rounds, n)
        label = f"{tokens:,} tokens ({len(pieces)} reads)"
        print(f"{label:<24}{mine * 1e6:>11.1f}{reference * 1e6:>15.1f}{mine / reference:>7.2f}")


if __name__ == "__main__":
    main()
