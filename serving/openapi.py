"""The published OpenAPI document, made standard and generator-friendly (openapi-python-client and co.).

`StandardOpenAPI` is an ASGI middleware that rewrites BentoML's `/docs.json` with `standard_openapi`, and
serves the docs page at `/` in place of BentoML's, whose template loads Google Tag Manager into the
service's origin (every visit to a deployment reported to a third party). This page is Swagger UI from the
assets BentoML serves itself, with Swagger's online validator off: it calls no other host.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json

from starlette.responses import HTMLResponse
from starlette.types import Receive, Scope, Send

from serving import card
from serving.answers import rewrite_response
from serving.edge import OPEN_PATHS

DESCRIPTION = (
    "Finds every face in a photo and estimates each person's age (years, with an interval) and gender. "
    'Every error answer is a JSON object `{"error": "..."}` saying what was wrong. How the model was made, '
    "how well it does and what not to use it for: GET /model_card."
)
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string", "title": "Message"}},
    "description": "Every error answer of this service: one message saying what was wrong and what is accepted",
}
# what RequestGuard answers itself, for every route that reads a body
BODY_ERRORS = {"400": "Bad Request", "408": "Request Timeout", "413": "Request Too Large"}
UPLOAD_ERRORS = {**BODY_ERRORS, "415": "Unsupported Media Type"}
# what any of the service's APIs may answer under load or a restart; the guard makes each an {"error"} too
LOAD_ERRORS = {
    "429": "Too Many Requests: a limit of this server is reached; retry after Retry-After seconds",
    "500": "Internal Server Error: a bug; its message says no more than that",
    "503": "Service Unavailable: a model batch could not be served in time, or a worker is restarting; retry after "
    "Retry-After seconds",
    "504": "Gateway Timeout: the request took longer than the service's timeout",
}
KEY_ERROR = {"401": "Unauthorized: the API key (AGE_GENDER_API_KEY) is missing or wrong"}
# the two ways serving/edge.py takes the key
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


MODEL_CARD_PATH = {
    "get": {
        "operationId": "model_card",
        "summary": "The served model's card: data, recipe, metrics by group, calibration, uses, limits",
        "responses": {
            "200": {"description": "Markdown", "content": {"text/markdown": {"schema": {"type": "string"}}}},
            "404": {
                "description": "the model was exported before model cards",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
}


def standard_openapi(spec: dict, max_images: int, api_key: bool) -> dict:
    """Make BentoML's spec standard and generator-friendly: OpenAPI 3.0 types instead of "file" and
    "tensor", operation ids named after the APIs (`predict`, not `AgeGender__predict`), schema names
    without BentoML's `IODescriptor` suffix or unused `__Input` copies; GET /model_card listed; multipart
    request bodies required and file arrays of 1 to max_images; the `{"error"}` answers of the request
    guard (400 / 408 / 413 / 415) and of any API (429 / 500 / 503 / 504; 401 and the key's security
    schemes when the service takes an API key); /annotate's answer as the PNG it is, not `image/*`."""

    def fix(node):
        if isinstance(node, dict):
            if node.get("type") == "file":
                node = {**node, "type": "string", "format": "binary"}
            elif node.get("type") == "tensor":
                node = {k: v for k, v in node.items() if k not in ("type", "format")} | {"type": "array", "items": {}}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    # "PhotoResultIODescriptor" and "PhotoResult" describe the same model: merging them is safe
    spec = fix(json.loads(json.dumps(spec).replace("IODescriptor", "")))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    # unreferenced copies of the inline request bodies; generators name both alike and then clash
    for name in [n for n in schemas if n.endswith("__Input")]:
        del schemas[name]
    schemas["Error"] = ERROR_SCHEMA
    # BentoML's info names its team and links its chat and badges (images from another host, missing offline);
    # its title (the service's name) stays: generators name the client package after it (age_gender_client)
    info = spec.get("info", {})
    version = str(info.get("version"))
    spec["info"] = {"title": info.get("title", "AgeGender"), "description": DESCRIPTION, "version": version}
    if version in ("None", ""):  # served from source, not from a built Bento (whose tag's version it is)
        spec["info"]["version"] = _release()
    spec.setdefault("paths", {})[card.ROUTE] = copy.deepcopy(MODEL_CARD_PATH)  # a mounted route BentoML does not list
    for path, operations in spec["paths"].items():
        for op in operations.values():
            if not isinstance(op, dict):
                continue
            errors = dict(KEY_ERROR) if api_key and path not in OPEN_PATHS else {}
            if api_key and path in OPEN_PATHS:
                op["security"] = []  # probes and scrapers carry no key
            if "x-bentoml-name" in op:  # one of the service's APIs
                op["operationId"] = op["x-bentoml-name"]
                errors |= LOAD_ERRORS
            answer = op.get("responses", {}).get("200", {}).get("content", {})
            if "image/*" in answer:  # /annotate answers PNG only; generators leave a wildcard answer out
                answer["image/png"] = answer.pop("image/*")
            content = op.get("requestBody", {}).get("content", {})
            if content:
                errors |= BODY_ERRORS
            if "multipart/form-data" in content:
                errors |= UPLOAD_ERRORS
                op["requestBody"]["required"] = True
                for prop in content["multipart/form-data"].get("schema", {}).get("properties", {}).values():
                    if prop.get("type") == "array":
                        prop["minItems"], prop["maxItems"] = 1, max_images
            for status, text in errors.items():
                op.setdefault("responses", {})[status] = {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
    if api_key:
        spec["components"]["securitySchemes"] = SECURITY_SCHEMES
        spec["security"] = [{name: []} for name in SECURITY_SCHEMES]  # either one
    return spec


def _release() -> str:
    """This project's version where it is installed (pip install -e . in a checkout), else "unreleased"."""
    try:
        return importlib.metadata.version("age-gender")
    except importlib.metadata.PackageNotFoundError:
        return "unreleased"


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Age and gender recognition: API</title>
  <link rel="stylesheet" href="./static_content/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js"></script>
  <script>
    window.onload = () => {
      window.ui = SwaggerUIBundle({url: "./docs.json", dom_id: "#swagger-ui", validatorUrl: null, deepLinking: true});
    };
  </script>
</body>
</html>
"""


class StandardOpenAPI:
    """ASGI middleware: the OpenAPI document at `path` comes out through standard_openapi(); `/` is
    DOCS_PAGE."""

    def __init__(self, app, max_images: int, api_key: bool, path: str = "/docs.json") -> None:
        self.app, self.path, self.max_images, self.api_key = app, path, max_images, api_key

    def _rewrite(self, status: int, body: bytes) -> bytes:
        return json.dumps(standard_openapi(json.loads(body), self.max_images, self.api_key)).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            return await HTMLResponse(DOCS_PAGE)(scope, receive, send)
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "GET":
            send = rewrite_response(send, self._rewrite, lambda status: status == 200)
        await self.app(scope, receive, send)
