"""GET /model_card: the served model's MODEL_CARD.md, written into the stored model by `training export`.

An ASGI middleware rather than a mounted app: a mount answers `/model_card` with a redirect to
`/model_card/`, which clients that do not follow redirects (curl without -L) show as an empty answer.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from models.artifact import CARD_FILE, stored_model

ROUTE = "/model_card"


class ModelCardRoute:
    def __init__(self, app, model: str) -> None:
        self.app = app
        stored = stored_model(model)  # resolved at start-up, as the model service resolves its BentoModel
        path = Path(stored.path) / CARD_FILE
        if path.is_file():
            self.card = Response(path.read_text(), media_type="text/markdown; charset=utf-8")
        else:
            message = f"model {stored.tag} has no model card: it was exported before cards existed; export it again"
            self.card = JSONResponse({"error": message}, status_code=404)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != ROUTE:
            await self.app(scope, receive, send)
            return
        response: Response
        if scope["method"] not in ("GET", "HEAD"):
            response = JSONResponse({"error": f"{ROUTE} answers GET only"}, status_code=405, headers={"Allow": "GET"})
        else:
            response = self.card
        await response(scope, receive, send)
