"""The tokenizer fallback: model → tokenizer, counts, request bodies, the offline cache."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.core.usage import Usage
from services.gateway import tokens
from services.gateway.tokens import (
    REPLY_PRIMING,
    TIKTOKEN_FILES,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TokenizerDataError,
    count_text,
    encoding_name,
    estimate_usage,
    gemini_prompt_tokens,
    prompt_tokens,
    seed_cache,
    tiktoken_cache_dir,
)

GPT4O, GPT4, CLAUDE = "openai/gpt-4o-mini", "openai/gpt-4-turbo", "anthropic/claude-sonnet-4"
CHINESE = "你好，世界！这是一个测试。"


@pytest.fixture(scope="module", autouse=True)
def scratch_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Seed tiktoken's files into a scratch directory, not the developer's ~/.cache."""
    directory = tmp_path_factory.mktemp("tiktoken-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection or name lookup is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network access attempted in a unit test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


# -- which tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("openai/gpt-4o", "o200k_base"),
        ("openai/gpt-4o-mini", "o200k_base"),
        ("openai/gpt-4o-2024-08-06:extended", "o200k_base"),
        ("openai/chatgpt-4o-latest", "o200k_base"),
        ("openai/gpt-4.1-nano", "o200k_base"),
        ("openai/gpt-4.5-preview", "o200k_base"),
        ("openai/gpt-5", "o200k_base"),
        ("openai/o1", "o200k_base"),
        ("openai/o3-mini-high", "o200k_base"),
        ("openai/o4-mini", "o200k_base"),
        ("gpt-4o", "o200k_base"),
        ("o3", "o200k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("openai/gpt-4-turbo", "cl100k_base"),
        ("openai/gpt-4-1106-preview", "cl100k_base"),
        ("openai/gpt-4-32k", "cl100k_base"),
        ("openai/gpt-3.5-turbo", "cl100k_base"),
        ("openai/gpt-3.5-turbo-0613:free", "cl100k_base"),
        ("gpt-4", "cl100k_base"),
        ("GPT-3.5-Turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0613:acme::abc123", "cl100k_base"),
        ("anthropic/claude-sonnet-4", "claude"),
        ("anthropic/claude-3.7-sonnet:thinking", "claude"),
        ("anthropic/claude-3-haiku", "claude"),
        ("~anthropic/claude-opus-latest", "claude"),
        ("claude-3-5-sonnet-20241022", "claude"),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", "claude"),
        ("google/gemini-2.5-flash", "o200k_base"),
        ("meta-llama/llama-3.1-8b-instruct:free", "o200k_base"),
        ("mistralai/mistral-large", "o200k_base"),
        ("deepseek/deepseek-r1", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_each_model_gets_its_tokenizer(model: str, expected: str) -> None:
    assert encoding_name(model) == expected


# -- counting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [
        ("Hello, world!", 4, 4),
        ("The quick brown fox jumps over the lazy dog.", 10, 10),
        ("def f(x):\n    return x ** 2\n", 11, 11),
        (CHINESE, 8, 12),  # o200k's larger vocabulary covers CJK far better
        ("", 0, 0),
    ],
)
def test_known_counts_under_each_openai_encoding(text: str, o200k: int, cl100k: int) -> None:
    assert count_text(GPT4O, text) == o200k
    assert count_text(GPT4, text) == cl100k


def test_claude_counts_with_its_own_tokenizer() -> None:
    assert count_text(CLAUDE, "Hello, world!") == 4
    assert count_text(CLAUDE, CHINESE) == 11
    assert count_text(CLAUDE, CHINESE) != count_text(GPT4O, CHINESE)
    assert count_text(CLAUDE, "    indented code with    many spaces") == 7
    assert count_text(GPT4O, "    indented code with    many spaces") == 8


@pytest.mark.parametrize("model", [GPT4O, GPT4, CLAUDE])
@pytest.mark.parametrize("text", ["<|endoftext|>", "<|endofprompt|>", "<|fim_prefix|>", "<EOT>"])
def test_special_token_text_counts_as_text(model: str, text: str) -> None:
    assert count_text(model, text) > 1
    assert count_text(model, f"a {text} b") > count_text(model, "a b")


@pytest.mark.parametrize("model", [GPT4O, GPT4, CLAUDE])
def test_odd_text_never_raises(model: str) -> None:
    assert count_text(model, "lone surrogate \ud800 from JSON") > 0
    assert count_text(model, "\x00\x01 control") > 0
    assert count_text(model, 42) == 0  # type: ignore[arg-type]
    assert 10_000 <= count_text(model, "billing " * 20_000) <= 40_000


def test_warm_loads_every_tokenizer() -> None:
    tokens.warm()
    assert set(tokens._loaded) == {"o200k_base", "cl100k_base", "claude"}


# -- request bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT4O, GPT4, CLAUDE])
def test_chat_prompt_is_its_parts_plus_formatting_overhead(model: str) -> None:
    system, question, answer = "You are terse.", "What is 2 + 2?", "4"
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "name": "ann", "content": question},
            {"role": "assistant", "content": answer},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Thanks"}, {"type": "image_url"}],
            },
        ],
    }
    parts = ["system", system, "user", "ann", question, "assistant", answer, "user", "Thanks"]
    expected = sum(count_text(model, part) for part in parts)
    expected += 4 * TOKENS_PER_MESSAGE + TOKENS_PER_NAME + REPLY_PRIMING
    assert prompt_tokens(model, body) == expected


def test_tools_and_tool_calls_count() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    plain = {"messages": [{"role": "user", "content": "Weather in Paris?"}]}
    with_tools = {**plain, "tools": [tool]}
    with_call = {
        "messages": [
            *plain["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    base = prompt_tokens(GPT4O, plain)
    assert prompt_tokens(GPT4O, with_tools) > base
    counted_call = count_text(GPT4O, "get_weather") + count_text(GPT4O, "{}")
    tool_reply = sum(count_text(GPT4O, t) for t in ("tool", "c1", "sunny"))
    assistant = TOKENS_PER_MESSAGE + count_text(GPT4O, "assistant")
    expected = base + assistant + counted_call + TOKENS_PER_MESSAGE + tool_reply
    assert prompt_tokens(GPT4O, with_call) == expected


def test_gemini_prompt_counts_text_parts_and_system_instruction() -> None:
    model = "google/gemini-2.5-flash"
    body = {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hello"}, {"inlineData": {"data": "AAAA"}}]},
            {"role": "model", "parts": [{"text": "Hi!"}]},
        ],
    }
    expected = sum(count_text(model, t) for t in ("Be brief.", "Hello", "Hi!"))
    assert gemini_prompt_tokens(model, body) == expected
    snake = {"system_instruction": body["systemInstruction"], "contents": body["contents"]}
    assert gemini_prompt_tokens(model, snake) == expected


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": None},
        {"messages": "hello"},
        {"messages": [None, 3, "x", {"role": 5, "content": {"text": "?"}}]},
        {"messages": [{"role": "user", "content": [None, 7, {"text": 8}, "bare"]}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}]}]},
        {"tools": [{"a": {1, 2}}], "prompt": ["a", 3]},
        {"contents": "hi", "systemInstruction": 5},
        {"contents": [{"parts": None}, {"parts": [None, {"text": None}]}]},
    ],
)
def test_odd_bodies_never_raise(body: dict[str, Any]) -> None:
    assert prompt_tokens(GPT4O, body) >= 0
    assert gemini_prompt_tokens(GPT4O, body) >= 0
    assert prompt_tokens(GPT4O, None) == 0  # type: ignore[arg-type]


def test_estimate_usage_is_all_uncached_input_and_completion() -> None:
    body = {"messages": [{"role": "user", "content": "Say hi"}]}
    usage = estimate_usage(GPT4O, body, "Hi there!")
    prompt = prompt_tokens(GPT4O, body)
    assert usage == Usage(prompt_tokens=prompt, uncached_input_tokens=prompt, completion_tokens=3)
    gemini = {"contents": [{"parts": [{"text": "Say hi"}]}]}
    assert estimate_usage("google/gemini-2.5-pro", gemini, "", gemini=True) == Usage(
        prompt_tokens=2, uncached_input_tokens=2
    )


# -- the offline cache --------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiktoken_hashes_and_urls_are_still_tiktokens() -> None:
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    for name, file in TIKTOKEN_FILES.items():
        assert f'"{file.url}"' in source, name
        assert f'expected_hash="{file.sha256}"' in source, name


def test_seeding_is_idempotent(tmp_path: Path, no_network: list[object]) -> None:
    first = seed_cache(tmp_path)
    stats = [path.stat() for path in first]
    second = seed_cache(tmp_path)
    assert first == second
    assert [p.stat().st_mtime_ns for p in second] == [s.st_mtime_ns for s in stats]
    assert [p.stat().st_ino for p in second] == [s.st_ino for s in stats]
    assert [_digest(p) for p in first] == [f.sha256 for f in TIKTOKEN_FILES.values()]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first)
    assert not no_network


def test_concurrent_seeding_leaves_whole_files(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def seed() -> None:
        try:
            seed_cache(tmp_path)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=seed) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(list(tmp_path.iterdir())) == len(TIKTOKEN_FILES)  # no temporary file left
    assert sorted(_digest(p) for p in tmp_path.iterdir()) == sorted(
        f.sha256 for f in TIKTOKEN_FILES.values()
    )


def test_corrupted_cache_fails_clearly_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    [o200k, _] = seed_cache(tmp_path)
    o200k.write_bytes(b"dGVzdA== 0\n")
    with pytest.raises(TokenizerDataError, match="sha256 .* refusing to use it; delete it"):
        seed_cache(tmp_path)
    # The loader itself (past the caches), as the gateway reaches it: same error, no download.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerDataError, match="cached o200k_base file"):
        tokens._load_tiktoken("o200k_base")
    assert o200k.read_bytes() == b"dGVzdA== 0\n"  # left for the operator to look at
    assert not no_network


def test_operator_cache_dir_is_used_and_seeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "ops"))
    assert tiktoken_cache_dir() == tmp_path / "ops"
    assert len(list((tmp_path / "ops").iterdir())) == len(TIKTOKEN_FILES)


def test_default_cache_dir_is_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would download on every load
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = tmp_path / "llm-billing" / "tiktoken"
    assert tiktoken_cache_dir() == expected
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(expected)


def test_unwritable_default_falls_back_to_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    monkeypatch.setattr(tokens.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    expected = tmp_path / "tmp" / f"llm-billing-{os.getuid()}" / "tiktoken"
    assert tiktoken_cache_dir() == expected
    assert len(list(expected.iterdir())) == len(TIKTOKEN_FILES)
