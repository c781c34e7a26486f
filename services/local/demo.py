"""``billing demo``: price realistic requests in every wire format and print what they cost."""

from __future__ import annotations

from typing import Any

import click

from services.core.errors import BillingError
from services.core.pricebook import PriceLookup
from services.core.quote import quote

SAMPLES: list[tuple[str, dict[str, Any]]] = [
    (
        "the original design's example (OpenRouter usage)",
        {
            "provider_model_id": "anthropic/claude-sonnet-4-5",
            "usage": {
                "prompt_tokens": 1800,
                "completion_tokens": 320,
                "total_tokens": 2120,
                "prompt_tokens_details": {"cached_tokens": 600},
                "completion_tokens_details": {"reasoning_tokens": 24},
            },
        },
    ),
    (
        "Anthropic Messages, 1-hour cache write",
        {
            "provider_model_id": "anthropic/claude-haiku-4.5",
            "format": "anthropic",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 21611,
                "cache_creation_input_tokens": 9365,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 0,
                    "ephemeral_1h_input_tokens": 9365,
                },
                "output_tokens": 44,
            },
        },
    ),
    (
        "OpenAI Responses, reasoning inside output",
        {
            "provider_model_id": "openai/gpt-5-mini",
            "format": "openai_responses",
            "usage": {
                "input_tokens": 4020,
                "input_tokens_details": {"cached_tokens": 4012},
                "output_tokens": 1915,
                "output_tokens_details": {"reasoning_tokens": 1600},
                "total_tokens": 5935,
            },
        },
    ),
    (
        "Gemini usageMetadata, thoughts outside candidates",
        {
            "provider_model_id": "google/gemini-2.5-flash",
            "usage": {
                "usageMetadata": {
                    "promptTokenCount": 17713,
                    "cachedContentTokenCount": 17379,
                    "candidatesTokenCount": 68,
                    "thoughtsTokenCount": 821,
                    "totalTokenCount": 18602,
                }
            },
        },
    ),
    (
        "OpenRouter, a web search, and a reported cost that drifts",
        {
            "provider_model_id": "openai/gpt-4.1",
            "usage": {
                "prompt_tokens": 5120,
                "completion_tokens": 410,
                "total_tokens": 5530,
                "server_tool_use_details": {"web_search_requests": 1},
                "cost": "0.0236",
            },
        },
    ),
    (
        "long context: the >200k tier applies",
        {
            "provider_model_id": "google/gemini-2.5-pro",
            "usage": {"prompt_tokens": 250000, "completion_tokens": 2000, "total_tokens": 252000},
        },
    ),
]


def run_demo(book: PriceLookup) -> None:
    header = f"{'model':<30} {'in':>7} {'cached':>7} {'written':>7} {'out':>6} {'reason':>6} "
    click.echo(header + f"{'cost USD':>12}  {'tier':<10} case")
    for title, request in SAMPLES:
        try:
            answer = quote(request, book)
        except BillingError as exc:
            click.echo(f"{request['provider_model_id']:<30} error: {exc}  ({title})")
            continue
        u, b = answer["usage"], answer["breakdown"]
        written = u["cache_write_tokens"] + u["cache_write_1h_tokens"]
        tier = f">{b['tier']['min_prompt_tokens']}" if b["tier"] else "base"
        click.echo(
            f"{answer['model']:<30} {u['prompt_tokens']:>7} {u['cache_read_tokens']:>7} "
            f"{written:>7} {u['completion_tokens']:>6} {u['reasoning_tokens']:>6} "
            f"{b['total_cost']:>12}  {tier:<10} {title}"
        )
        if "drift" in answer:
            click.echo(f"{'':<30} reported {answer['reported_cost']}, drift {answer['drift']}")
    click.echo("\nQuote any usage: billing quote --model M --usage-json '{...}'  (see README)")
