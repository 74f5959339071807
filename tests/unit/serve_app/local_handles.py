"""Stand-ins for Ray Serve's DeploymentHandle, so the Ingress can drive plain deployment objects in one process
(unit tests, no Serve)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator, Callable


class LocalHandle:
    """A plain object with the call shape of a DeploymentHandle (`h.method.remote(...)`, `.options(stream=True)`)."""

    def __init__(self, target: Any, stream: bool = False):
        self._target = target
        self._stream = stream

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> "_LocalMethod":
        return _LocalMethod(getattr(self._target, name), self._stream)


class _LocalMethod:
    def __init__(self, method: Callable, stream: bool):
        self.method = method
        self.stream = stream

    def remote(self, *args: Any, **kwargs: Any):
        if self.stream:
            return _LocalStream(self.method(*args, **kwargs))
        return asyncio.ensure_future(_resolve(self.method(*args, **kwargs)))


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _LocalStream:
    """An async generator with DeploymentResponseGenerator's `cancel()`."""

    def __init__(self, gen: AsyncIterator):
        self._gen = gen

    def __aiter__(self) -> "_LocalStream":
        return self

    async def __anext__(self) -> Any:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._gen.aclose())
