"""The gateway's JSON response class."""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class ORJSONResponse(JSONResponse):
    """JSON rendered by orjson (every body here is str/int/bool/None: money is already text)."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError:
            # A lone surrogate ("\ud800" in the request's JSON) echoed in an error message
            # cannot be UTF-8: it is written as U+FFFD, the replacement character.
            return orjson.dumps(_valid_unicode(content))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_valid_unicode(k): _valid_unicode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_valid_unicode(v) for v in value]
    return value
