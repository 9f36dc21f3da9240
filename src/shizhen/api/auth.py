"""Bearer API keys, compared in constant time; never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from ..errors import AuthenticationFailed


def require_api_key(request: Request) -> None:
    keys = request.app.state.context.settings.api_keys
    if not keys:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    presented_bytes = presented.strip().encode()
    matches = [hmac.compare_digest(presented_bytes, key.get_secret_value().encode()) for key in keys]
    if not any(matches):
        raise AuthenticationFailed("invalid API key", code="invalid_api_key")
