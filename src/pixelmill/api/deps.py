"""Typed dependencies of the routes: the runtime and the caller.

They are coroutines although nothing in them waits: FastAPI runs a plain function
dependency in a worker thread, a hop that cost more than the dependency itself.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from pixelmill.api.errors import ApiError
from pixelmill.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_owner(
    request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> str | None:
    """The caller's identity: a digest of its API key, or None when the API is open."""
    keys = runtime.settings.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send an API key as 'Authorization: Bearer KEY'")
    if not any(hmac.compare_digest(token.strip(), key) for key in keys):
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return hashlib.sha256(token.strip().encode()).hexdigest()[:32]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
