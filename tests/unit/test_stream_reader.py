"""The stream reader keeps SSE lines unparsed until it needs them: the same usage, text and
errors as parsing every line as it passes, in any chunking."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.capture import OPENAI, Seen, StreamReader
from services.gateway.gemini import GEMINI


def sse(*documents: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in documents)


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"delta": {"content": text}}], "usage": None}


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "cost": Decimal("0.000020000000000000001")}
"""A cost with more digits than a float holds: it must arrive as the exact Decimal."""


def usage_line() -> bytes:
    text = json.dumps({"choices": [], "usage": {**USAGE, "cost": "COST"}})
    return b"data: " + text.replace('"COST"', str(USAGE["cost"])).encode() + b"\n\n"


def read(stream: bytes, sizes: list[int] | None = None, dialect: Any = OPENAI) -> Seen:
    reader = StreamReader(dialect)
    at = 0
    for size in sizes or [len(stream)]:
        reader.feed(stream[at : at + size])
        at += size
    reader.feed(stream[at:])
    reader.end()
    return reader.seen


def eager(stream: bytes, dialect: Any = OPENAI) -> Seen:
    """What parsing every line at once, exactly, gives."""
    seen = Seen()
    for line in stream.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:") and line != b"data: [DONE]":
            document = json.loads(line[5:], parse_float=Decimal)
            if isinstance(document, dict):
                seen.observe(dialect, document)
    return seen


def test_the_usage_of_the_last_chunk_arrives_exact_without_reading_the_text() -> None:
    stream = sse(*(delta(f"w{i} ") for i in range(20))) + usage_line()
    seen = read(stream + b"data: [DONE]\n\n")
    assert seen.usage["cost"] == Decimal("0.000020000000000000001")
    assert seen.text == []  # not parsed: nobody needed it
    seen.settle()
    assert "".join(seen.text) == "".join(f"w{i} " for i in range(20))


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.text(min_size=0, max_size=8), max_size=30),
    usage_at=st.one_of(st.none(), st.integers(min_value=0, max_value=30)),
    error=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
    small_limit=st.booleans(),
)
def test_any_chunking_gives_what_reading_every_line_gives(
    words: list[str], usage_at: int | None, error: bool, cuts: list[int], small_limit: bool
) -> None:
    lines = [sse(delta(w)) for w in words]
    if usage_at is not None:
        lines.insert(min(usage_at, len(lines)), usage_line())
    if error:
        lines.append(sse({"error": {"message": "upstream failed"}}))
    stream = b"".join(lines) + b"data: [DONE]\n\n"
    reader = StreamReader(OPENAI, max_unread=100 if small_limit else StreamReader.MAX_UNREAD)
    at = 0
    for size in cuts:
        reader.feed(stream[at : at + size])
        at += size
    reader.feed(stream[at:])
    reader.end()
    seen, expected = reader.seen, eager(stream)
    assert seen.usage == expected.usage
    seen.settle()
    assert (seen.text, seen.error) == (expected.text, expected.error)


def test_gemini_running_totals_keep_the_last() -> None:
    def chunk(text: str, candidates: int) -> dict[str, Any]:
        return {
            "candidates": [{"content": {"parts": [{"text": text}]}}],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": candidates},
        }

    stream = sse(chunk("a", 1), chunk("b", 2), {"candidates": [], "usageMetadata": {}})
    seen = read(stream, [5, 17, 3], dialect=GEMINI)
    assert seen.usage == {"promptTokenCount": 7, "candidatesTokenCount": 2}
    assert seen.usage == eager(stream, GEMINI).usage


def test_a_long_stream_is_parsed_as_it_goes_so_unread_lines_stay_bounded() -> None:
    reader = StreamReader(OPENAI)
    one = sse(delta("x" * 100))
    for _ in range(5000):  # ~0.7 MB of lines
        reader.feed(one)
    assert sum(map(len, reader.seen.unread)) <= StreamReader.MAX_UNREAD + len(one)
    reader.end()
    reader.seen.settle()
    assert "".join(reader.seen.text) == "x" * 100 * 5000


def test_a_chunk_whose_text_cannot_be_read_is_ignored_whole_as_before() -> None:
    # The last usage-bearing chunk has "choices" that are not a list: observe() ignores such
    # a chunk, so the usage billed is the one before it, whichever way the lines are read.
    broken = {"choices": 5, "usage": {"prompt_tokens": 99, "completion_tokens": 99}}
    stream = sse(delta("a")) + usage_line() + sse(broken) + b"data: [DONE]\n\n"
    for limit in (StreamReader.MAX_UNREAD, 10):
        reader = StreamReader(OPENAI, max_unread=limit)
        reader.feed(stream)
        reader.end()
        assert reader.seen.usage == eager(stream).usage
        assert reader.seen.usage["prompt_tokens"] == 12


def test_a_line_nested_too_deep_to_read_is_skipped_not_raised() -> None:
    deep = b"data: " + b"[" * 1100 + b"]" * 1100 + b"\n\n"
    stream = sse(delta("a")) + deep + usage_line() + deep + b"data: [DONE]\n\n"
    for limit in (StreamReader.MAX_UNREAD, 10):
        reader = StreamReader(OPENAI, max_unread=limit)
        reader.feed(stream)
        reader.end()
        assert reader.seen.usage["cost"] == Decimal("0.000020000000000000001")
        reader.seen.settle()
        assert reader.seen.text == ["a"]
