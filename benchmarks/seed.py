"""A seed-style server to compare the service against: one process, detection then torch per request.

This is how the original project served (one FastAPI process; FastAPI is Starlette underneath, which is
what runs here): no separate detector processes, no batching across requests, torch eager on every
face. `python -m benchmarks.seed MODEL_DIR PORT` serves POST /predict (multipart field `image`).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from models.artifact import ModelMeta, stored_meta
from models.faces import FaceDetector, align_crop
from models.images import MAX_PIXELS, decode_image
from models.network import load_network
from models.presets import eval_preset


def app(model_dir: str, meta: ModelMeta) -> Starlette:
    net, detector = load_network(model_dir, meta), FaceDetector()
    preprocess = eval_preset(meta.image_size, meta.normalisation.mean, meta.normalisation.std)  # in torch

    def answer(data: bytes) -> dict:
        rgb = decode_image(data, MAX_PIXELS)
        faces = detector.detect(rgb)
        if not faces:
            return {"faces": []}
        crops = torch.from_numpy(np.stack([align_crop(rgb, f) for f in faces])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            age, logits = net(preprocess(crops))
        return {"faces": [{"age": float(a), "p": p.tolist()} for a, p in zip(age, logits.softmax(1), strict=True)]}

    async def predict(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["image"].read()
        return JSONResponse(await run_in_threadpool(answer, data))  # what a sync FastAPI endpoint does

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


if __name__ == "__main__":
    import bentoml

    stored = bentoml.models.get(sys.argv[1])
    uvicorn.run(app(stored.path, stored_meta(stored)), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
