"""GET /model_card: the served model's MODEL_CARD.md, written into the stored model by `training export`.

An ASGI middleware rather than a mounted app: a mount answers `/model_card` with a redirect to
`/model_card/`, which clients that do not follow redirects (curl without -L) show as an empty answer.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import JSONResponse, Response

from models.artifact import CARD_FILE
from serving.guard import Receive, Scope, Send

ROUTE = "/model_card"


class ModelCardRoute:
    def __init__(self, app, model: str) -> None:
        self.app, self.model = app, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != ROUTE:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            response = JSONResponse({"error": f"{ROUTE} answers GET only"}, status_code=405, headers={"Allow": "GET"})
        else:
            response = self.card()
        await response(scope, receive, send)

    def card(self) -> Response:
        import bentoml

        model = bentoml.models.get(self.model)  # the served model: the service could not start without it
        path = Path(model.path) / CARD_FILE
        if not path.is_file():
            message = f"model {model.tag} has no model card: it was exported before cards were written; export it again"
            return JSONResponse({"error": message}, status_code=404)
        return Response(path.read_text(), media_type="text/markdown; charset=utf-8")
