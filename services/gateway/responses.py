"""The gateway's JSON response class."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class ORJSONResponse(JSONResponse):
    """JSON rendered by orjson (every body here is str/int/bool/None: money is already text)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
