"""Where the gateway sends Gemini-native requests: the Gemini API or Vertex AI, as set.

The first of these that is set decides (the README's table says the same):
``VERTEX_BASE_URL`` (Gemini API shape, e.g. the fake upstream), ``VERTEX_PROJECT`` (Vertex
regional, an OAuth access token as ``VERTEX_API_KEY``), ``VERTEX_API_KEY`` alone (Vertex
express mode); none: no Gemini upstream (503).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from services.adapters.settings import Settings


@dataclass(frozen=True, slots=True)
class GeminiTarget:
    """Where the gateway sends Gemini requests, and with which of its own credentials."""

    models_url: str
    """Everything before ``/{model}:{action}``."""
    headers: Mapping[str, str]
    provider: str
    """What the billed event names as the provider: ``google-ai-studio`` or ``vertex``."""

    def url(self, model: str, action: str) -> str:
        return f"{self.models_url}/{model}:{action}"


def gemini_target(settings: Settings) -> GeminiTarget | None:
    """The upstream the settings name (see the module docstring), or ``None`` if none."""
    secret = settings.vertex_api_key
    key = secret.get_secret_value() if secret else None
    json_only = {"content-type": "application/json"}
    if settings.vertex_base_url:
        return GeminiTarget(
            settings.vertex_base_url.rstrip("/") + "/v1beta/models",
            json_only | ({"x-goog-api-key": key} if key else {}),
            "google-ai-studio",
        )
    if settings.vertex_project:
        region = quote(settings.vertex_region, safe="")
        project = quote(settings.vertex_project, safe="")
        host = ("" if region == "global" else f"{region}-") + "aiplatform.googleapis.com"
        return GeminiTarget(
            f"https://{host}/v1/projects/{project}/locations/{region}/publishers/google/models",
            json_only | ({"authorization": f"Bearer {key}"} if key else {}),
            "vertex",
        )
    if key:
        return GeminiTarget(
            "https://aiplatform.googleapis.com/v1/publishers/google/models",
            json_only | {"x-goog-api-key": key},
            "vertex",
        )
    return None
