"""The seam between the frontend and whatever runs invocations: this node's sandboxes
(ember.invoke.local.LocalInvoker) or the cluster's leaders and workers (ember.cluster.frontend.ClusterInvoker).
The frontend sees only this."""

from __future__ import annotations

from typing import Any, Protocol

from ember.sandbox.process import Invocation, Outcome
from ember.store import FunctionRecord


class Invoker(Protocol):
    async def invoke(
        self,
        rec: FunctionRecord,
        payload: bytes,
        request_id: str,
        client_context: str | None = None,
        want_tail: bool = False,
    ) -> tuple[Invocation, Outcome]:
        """Run one synchronous invocation; raises ember.api.errors.LambdaError for throttles and rejections."""
        ...

    def health(self) -> dict[str, Any]:
        """What GET /health adds about the invoke path (sandboxes, starts, isolation)."""
        ...
