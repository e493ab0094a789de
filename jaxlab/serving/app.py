"""The FastAPI application: routes, API-key check, request counting and the engine's lifetime.

``/v1/*`` routes need ``Authorization: Bearer KEY`` when the server has an API key (401
otherwise); ``/health`` and ``/metrics`` are open, as in vLLM. The engine thread starts with the
application and stops after the last connection has closed, so a server that is asked to stop
(Ctrl-C, SIGTERM) first finishes the requests in flight.
"""

from __future__ import annotations

import contextlib
import hmac

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from jaxlab.serving.base import ClientGone, ServerState
from jaxlab.serving.errors import OpenAIError, install_error_handlers
from jaxlab.serving.metrics import CONTENT_TYPE
from jaxlab.serving.protocol import ChatCompletionRequest, CompletionRequest
from jaxlab.serving.serving_chat import create_chat_completion
from jaxlab.serving.serving_completions import create_completion

__all__ = ["build_app"]

_COUNTED = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class _CountRequests:
    """Counts answered ``/v1`` requests by endpoint and status (a plain ASGI middleware: it does
    not buffer streamed responses or hide client disconnects, as Starlette's
    ``BaseHTTPMiddleware`` would)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = next((p for p in _COUNTED if path == p or path.startswith(p + "/")), "other")
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


def build_app(state: ServerState) -> FastAPI:
    """The application serving ``state`` (whose engine loop it starts and stops)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()

    app = FastAPI(title="jaxlab OpenAI-compatible server", lifespan=lifespan, docs_url=None)
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody is listening

    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise OpenAIError(
                401,
                "Incorrect API key provided: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_card() -> dict:
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "jaxlab",
            "max_model_len": state.max_len,
        }

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str):
        state.check_model(model)
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        s = state.loop.state()
        ok = state.loop.running
        body = {
            "status": "ok" if ok else "stopped",
            "model": state.model_name,
            "slots": s["slots"],
            "slots_active": s["slots_active"],
            "queue_depth": s["queue_depth"],
            "requests_running": s["requests_running"],
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_CountRequests, state=state)
    return app
