"""Token counts for usage the upstream did not report (a cut stream, usage left out).

Which tokenizer a model gets (:func:`encoding_name`):

* ``o200k_base`` (tiktoken): GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series (o1, o3, o4…);
* ``cl100k_base`` (tiktoken): the older OpenAI models — gpt-4, gpt-4-turbo, gpt-3.5-turbo;
* ``claude``: every ``anthropic/*`` or ``claude`` model. This is the tokenizer Anthropic
  published for its earlier Claude models (shipped as ``anthropic/tokenizer.json`` up to
  SDK 0.38.0); Claude 3 and later use an unpublished one, so counts are an approximation;
* everything else (google, meta-llama, mistral, qwen, deepseek…): no tokenizer of theirs is
  bundled, so ``o200k_base`` stands in as an approximation.

Every count made here is billed with ``usage_source="estimated"``, so an approximation is
visible as one.

Offline: tiktoken downloads its encoding files on first use, and production may have no
route out. The files come instead from the ``bpe-openai`` wheel (gzipped copies of OpenAI's
files); they are decompressed into tiktoken's cache directory under the names tiktoken looks
for, after checking the SHA-256 tiktoken itself expects. A cached file that does not match
raises :class:`TokenizerDataError` — tiktoken would delete it and download it again, which
must never happen silently. The cache directory is ``TIKTOKEN_CACHE_DIR`` when the operator
set it (seeded there if files are missing), otherwise ``$XDG_CACHE_HOME/llm-billing/
tiktoken`` (or ``~/.cache/…``, then the temporary directory when that is not writable), and
``TIKTOKEN_CACHE_DIR`` is set to it for the process. An empty ``TIKTOKEN_CACHE_DIR`` (which
would make tiktoken download on every load) is replaced too.

Tokenizers load lazily, once, under a lock; counting is thread-safe. :func:`warm` loads all
three (about half a second) and is meant to run in a thread at start-up.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeGuard

from services.core.usage import Usage

log = logging.getLogger("billing.tokens")

EncodingName = Literal["o200k_base", "cl100k_base", "claude"]
ENCODINGS: Final[tuple[EncodingName, ...]] = ("o200k_base", "cl100k_base", "claude")

# OpenAI's chat formatting, as documented in its token-counting cookbook.
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING: Final = 3


class TokenizerDataError(RuntimeError):
    """A tokenizer file is missing, unwritable, or not the file its hash says it must be."""


class _TiktokenFile(NamedTuple):
    url: str
    """Where tiktoken would fetch it; its SHA-1 is the file's name in the cache."""
    sha256: str


# Mirrors tiktoken_ext/openai_public.py (a unit test checks the two still agree).
TIKTOKEN_FILES: Final[Mapping[str, _TiktokenFile]] = {
    "o200k_base": _TiktokenFile(
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": _TiktokenFile(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
CLAUDE_TOKENIZER_SHA256: Final = "c241737df24b4e7f7c9af4fdcee29a0ca903dcb288a8b753bc346a3092911767"

_CL100K_MODEL = re.compile(
    r"gpt-4(?![o.])|gpt-3\.5|gpt-35|text-embedding-(?:ada|3)|davinci-002|babbage-002"
)


def encoding_name(model: str) -> EncodingName:
    """The tokenizer for a model id: an OpenRouter slug (``openai/gpt-4o:free``) or bare."""
    name = model.strip().lower().removeprefix("~").removeprefix("ft:").split(":", 1)[0]
    provider, _, bare = name.rpartition("/")
    if provider == "anthropic" or "claude" in bare:
        return "claude"
    if _CL100K_MODEL.match(bare):
        return "cl100k_base"
    return "o200k_base"


def count_text(model: str, text: str) -> int:
    """Tokens in ``text`` for ``model``; special-token text such as ``<|endoftext|>`` is text."""
    return _counter(encoding_name(model))(text) if isinstance(text, str) and text else 0


def prompt_tokens(model: str, body: Mapping[str, Any]) -> int:
    """Input tokens of an OpenAI chat-completions request body.

    Message strings (role, content, name…) and text content parts are counted, with
    OpenAI's formatting overhead: 3 per message, 1 per name, 3 priming the reply. Tool
    calls count their name and arguments; ``tools``, ``functions`` and a JSON
    ``response_format`` count as compact JSON (OpenAI renders them differently, so this is
    close, not exact). Images, audio and files are not counted.
    """
    if not isinstance(body, Mapping):
        return 0
    count = _counter(encoding_name(model))
    total = 0
    messages = body.get("messages")
    if _is_list(messages) and messages:
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if isinstance(message, Mapping):
                total += _message_tokens(count, message)
        total += REPLY_PRIMING
    prompt = body.get("prompt")  # the legacy completions API
    total += sum(count(text) for text in _strings(prompt))
    for key in ("tools", "functions"):
        if body.get(key):
            total += count(_json(body[key]))
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") != "text":
        total += count(_json(response_format))
    return total


def gemini_prompt_tokens(model: str, body: Mapping[str, Any]) -> int:
    """Input tokens of a Gemini ``generateContent`` body: its text parts and system
    instruction, function calls, responses and declarations as compact JSON (no overhead:
    Google documents none)."""
    if not isinstance(body, Mapping):
        return 0
    count = _counter(encoding_name(model))
    total = 0
    for key in ("systemInstruction", "system_instruction"):
        total += _gemini_content(count, body.get(key))
    contents = body.get("contents")
    for content in contents if _is_list(contents) else (contents,):
        total += _gemini_content(count, content)
    if body.get("tools"):
        total += count(_json(body["tools"]))
    return total


def estimate_usage(
    model: str, body: Mapping[str, Any], completion_text: str, *, gemini: bool = False
) -> Usage:
    """Usage counted from the request body and the text generated (no cache, no reasoning
    split: neither can be seen from outside)."""
    prompt = gemini_prompt_tokens(model, body) if gemini else prompt_tokens(model, body)
    return Usage(
        prompt_tokens=prompt,
        uncached_input_tokens=prompt,
        completion_tokens=count_text(model, completion_text),
    )


def warm() -> None:
    """Load every tokenizer now rather than on the first estimate."""
    for name in ENCODINGS:
        _counter(name)


# -- loading -------------------------------------------------------------------------------

_Counter = Callable[[str], int]
_loaded: dict[str, _Counter] = {}
_lock = threading.Lock()


def _counter(name: EncodingName) -> _Counter:
    counter = _loaded.get(name)
    if counter is None:
        with _lock:
            counter = _loaded.get(name)
            if counter is None:
                started = time.perf_counter()
                counter = _load_claude() if name == "claude" else _load_tiktoken(name)
                log.info("tokenizer %s loaded in %.2fs", name, time.perf_counter() - started)
                _loaded[name] = counter
    return counter


def _load_tiktoken(name: str) -> _Counter:
    tiktoken_cache_dir((name,))
    import tiktoken

    encoding = tiktoken.get_encoding(name)
    # encode_ordinary is encode(text, disallowed_special=()): special tokens count as text.
    return lambda text: len(encoding.encode_ordinary(text))


def _load_claude() -> _Counter:
    from tokenizers import Tokenizer

    path = _package_file("anthropic", "tokenizer.json")
    raw = path.read_bytes()
    _check(raw, CLAUDE_TOKENIZER_SHA256, f"{path} (from the anthropic 0.38.0 wheel)")
    tokenizer = Tokenizer.from_str(raw.decode())
    tokenizer.encode_special_tokens = True  # "<EOT>" in a prompt is text, as with tiktoken

    def count(text: str) -> int:
        try:
            return len(tokenizer.encode(text, add_special_tokens=False).ids)
        except TypeError:  # lone surrogates (from JSON "\ud800") are not valid UTF-8
            clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return len(tokenizer.encode(clean, add_special_tokens=False).ids)

    return count


def tiktoken_cache_dir(names: Iterable[str] = TIKTOKEN_FILES) -> Path:
    """The directory tiktoken reads its files from, with ``names`` seeded in it; exported as
    ``TIKTOKEN_CACHE_DIR`` for this process when the operator did not set it."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        seed_cache(Path(configured), names)
        return Path(configured)
    candidates = [
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-billing",
        Path(tempfile.gettempdir()) / f"llm-billing-{os.getuid()}",
    ]
    for candidate in candidates:
        directory = candidate / "tiktoken"
        try:
            seed_cache(directory, names)
        except TokenizerDataError as exc:
            if not isinstance(exc.__cause__, OSError):
                raise
            log.warning("%s; trying the next cache directory", exc)
            continue
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        return directory
    raise TokenizerDataError(f"no writable tiktoken cache in {candidates}; set TIKTOKEN_CACHE_DIR")


def seed_cache(cache_dir: Path, names: Iterable[str] = TIKTOKEN_FILES) -> list[Path]:
    """Put each encoding's file in ``cache_dir`` under tiktoken's name for it, unless a
    correct one is already there; check the ones that are. Safe to run concurrently."""
    return [_seed_one(Path(cache_dir), name) for name in names]


def _seed_one(cache_dir: Path, name: str) -> Path:
    spec = TIKTOKEN_FILES[name]
    path = cache_dir / hashlib.sha1(spec.url.encode(), usedforsecurity=False).hexdigest()
    try:
        if path.exists():
            _check(path.read_bytes(), spec.sha256, f"cached {name} file {path}", _REMEDY)
            return path
        bundled = _package_file("bpe_openai", "data", f"{name}.tiktoken.gz")
        data = gzip.decompress(bundled.read_bytes())
        _check(data, spec.sha256, f"{bundled} (from the bpe-openai wheel)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Whole file or nothing under the final name, whoever else is seeding the same dir.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o644)  # public data; mkstemp's 0600 would lock out other users
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise TokenizerDataError(f"cannot seed the tiktoken cache {cache_dir}: {exc}") from exc
    return path


_REMEDY: Final = "; delete it to have it re-seeded from the bundled copy"


def _check(data: bytes, expected: str, what: str, remedy: str = "") -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise TokenizerDataError(
            f"{what} has sha256 {actual}, expected {expected}: refusing to use it{remedy}"
        )


def _package_file(package: str, *parts: str) -> Path:
    # find_spec locates a top-level package without importing it (bpe_openai's import loads
    # a 74 MB extension, anthropic's the whole SDK): only their data files are wanted here.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerDataError(f"package {package!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise TokenizerDataError(f"{path} is missing from the installed {package!r}")
    return path


# -- request bodies ------------------------------------------------------------------------


def _message_tokens(count: _Counter, message: Mapping[str, Any]) -> int:
    total = 0
    for key, value in message.items():
        if isinstance(value, str):
            total += count(value) + (TOKENS_PER_NAME if key == "name" else 0)
        elif key == "content" and _is_list(value):
            for part in value:
                text = part.get("text") if isinstance(part, Mapping) else part
                total += count(text) if isinstance(text, str) else 0
        elif key == "tool_calls" and _is_list(value):
            for call in value:
                if isinstance(call, Mapping):
                    total += _function_tokens(count, call.get("function"))
        elif key == "function_call":
            total += _function_tokens(count, value)
    return total


def _function_tokens(count: _Counter, function: object) -> int:
    if not isinstance(function, Mapping):
        return 0
    name, arguments = function.get("name"), function.get("arguments")
    return sum(count(v) if isinstance(v, str) else 0 for v in (name, arguments))


def _gemini_content(count: _Counter, content: object) -> int:
    if isinstance(content, str):
        return count(content)
    if not isinstance(content, Mapping) or not _is_list(parts := content.get("parts")):
        return 0
    total = 0
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        for key, value in part.items():
            if key == "text" and isinstance(value, str):
                total += count(value)
            elif key in _GEMINI_JSON_PARTS:
                total += count(_json(value))
    return total


_GEMINI_JSON_PARTS: Final = frozenset(
    {"functionCall", "function_call", "functionResponse", "function_response"}
)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if _is_list(value) else []


def _is_list(value: object) -> TypeGuard[Sequence[Any]]:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # circular, or keys JSON cannot hold
        return ""
