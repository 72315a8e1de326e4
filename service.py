"""Age and gender recognition service: `bentoml serve service:AgeGender`.

Three services, each in its own process(es):
- FaceDetection:  upload bytes -> decoded photo, faces, aligned 200x200 crops (CPU).
- AgeGenderModel: aligned crops -> age and gender, with adaptive batching across requests (GPU if any).
- AgeGender:      the public HTTP API; fans photos out to the detector, crops into shared model batches.
Settings come from AGE_GENDER_* environment variables (serving/settings.py).
"""

from __future__ import annotations

import os

# Before cv2 (or torch) loads OpenMP (read once per process): no OpenMP thread teams. The earlier
# detector's spinning OpenMP threads starved the model service on 2 cores (BENCHMARKS.md); each
# detector process is one core's worth of work anyway. ONNX Runtime has its own pool; the torch
# runtime sets its own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio
from pathlib import Path

import bentoml
import cv2
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from models.artifact import CARD_FILE, array_preprocess_for
from models.errors import TooLarge, UserError
from models.faces import CROP_SIZE, FaceDetector, align_crop
from models.images import decode_image
from models.outputs import answers, calibration, decode
from models.runtime import open_runtime, visible_gpus
from serving import patches
from serving.annotate import annotate
from serving.dependencies import call_dependency
from serving.guard import FileField, RequestGuard, error
from serving.openapi import StandardOpenAPI
from serving.schemas import BatchResult, DetectedFace, FaceAttributes, FacesResult, ModelInfo, PhotoResult
from serving.settings import DETECTOR_WORKERS, SETTINGS

# inter-service HTTP sessions are otherwise recycled under in-flight requests (BentoML #5540, #5544)
_CONNECTION = {"runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e9}}
patches.apply()  # BentoML 1.4.40: /readyz during worker restarts, per-request timers (serving/patches.py)


def _error(exc: UserError, prefix: str = "") -> dict:
    return {"error": prefix + str(exc), "status": 413 if isinstance(exc, TooLarge) else 400}


# one detector process per CPU core by default: detection is the CPU-bound step of /predict
@bentoml.service(workers=DETECTOR_WORKERS, traffic={"timeout": 60}, **_CONNECTION)
class FaceDetection:
    def __init__(self) -> None:
        self.detector = FaceDetector(SETTINGS.detector, SETTINGS.score_threshold, SETTINGS.min_face_size)

    @bentoml.api
    def detect(self, image: bytes) -> dict:
        """-> {width, height, boxes (N, 4), scores (N,), crops (N, 200, 200, 3) uint8} or {error, status}."""
        try:
            rgb = decode_image(image, SETTINGS.max_pixels)
        except UserError as exc:
            return _error(exc)
        faces = self.detector.detect(rgb)
        crops = (
            np.stack([align_crop(rgb, f) for f in faces]) if faces else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        )
        return {
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "boxes": [f.box for f in faces],
            "scores": [f.score for f in faces],
            "crops": crops,
        }

    @bentoml.api
    def name(self) -> str:
        """The detector in use: the configured one, or `haar` where MTCNN's nets cannot load."""
        return self.detector.name

    @bentoml.api
    def load_crops(self, images: list[bytes]) -> dict:
        """Already-cropped faces -> {crops (N, 200, 200, 3)} or {error, status}; resized as UTKFace chips."""
        crops = []
        for i, data in enumerate(images):
            try:
                rgb = decode_image(data, SETTINGS.max_pixels)
            except UserError as exc:
                return _error(exc, f"image #{i}: ")
            crops.append(
                rgb
                if rgb.shape[:2] == (CROP_SIZE, CROP_SIZE)
                else cv2.resize(rgb, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
            )
        return {"crops": np.stack(crops)}


# BentoML assigns the GPU (CUDA_VISIBLE_DEVICES) when one exists; without one the model runs on the CPU
@bentoml.service(workers=1, resources={"gpu": 1} if visible_gpus() else {}, traffic={"timeout": 60}, **_CONNECTION)
class AgeGenderModel:
    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.meta = self.model_ref.info.metadata
        self.runtime = open_runtime(SETTINGS.runtime, self.model_ref.path, self.meta)
        self.preprocess = array_preprocess_for(self.meta)  # numpy: this process needs no torch for ONNX

    @bentoml.api(
        batchable=SETTINGS.max_batch_size > 1,  # AGE_GENDER_MAX_BATCH_SIZE=1: one request per model call
        batch_dim=0,
        max_batch_size=max(2, SETTINGS.max_batch_size),
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def predict(self, crops: np.ndarray) -> np.ndarray:
        """(B, 200, 200, 3) uint8 aligned crops -> (B, 6) float32: models.outputs.COLUMNS, P(each gender)."""
        age_out, logits = self.runtime(self.preprocess(crops))  # from (B, 3, S, S) normalised float
        return decode(age_out, logits, self.meta, SETTINGS.interval_level)

    @bentoml.api
    def info(self) -> dict:
        return {
            "tag": str(self.model_ref.tag),
            "backbone": self.meta["backbone"],
            "image_size": self.meta["image_size"],
            "dataset": self.meta["dataset"]["name"],
            "demo": self.meta["demo"],
            "test_metrics": self.meta.get("metrics", {}).get("test", {}),
            "gender_classes": self.meta["gender_classes"],
            "device": self.runtime.device,
            "runtime": self.runtime.name,
            "age_head": self.meta.get("age_head", "regression"),
            "interval_level": SETTINGS.interval_level,
            "gender_temperature": float(calibration(self.meta).get("gender_temperature", 1.0)),
            "model_card": "/model_card",
        }


ROUTES = {
    "/predict": FileField("image", many=False),
    "/predict_batch": FileField("images", many=True),
    "/predict_faces": FileField("images", many=True),
    "/annotate": FileField("image", many=False),
}
UI = Path(__file__).resolve().parent / "serving" / "ui"


@bentoml.service(workers=SETTINGS.api_workers, traffic={"timeout": 120, "max_concurrency": 128})
class AgeGender:
    detector = bentoml.depends(FaceDetection)
    model = bentoml.depends(AgeGenderModel)

    def __init__(self) -> None:
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()  # the first burst of requests asks the dependencies once

    async def _model_info(self) -> dict:
        async with self._info_lock:
            if self._info is None:
                info, detector = await asyncio.gather(
                    call_dependency(self.model.to_async.info), call_dependency(self.detector.to_async.name)
                )
                self._info = {**info, "detector": detector}
        return self._info

    async def _attributes(self, crops: np.ndarray) -> list[dict]:
        """Crops -> per-face attributes; each chunk is one request to the batching model service."""
        if len(crops) == 0:
            return []
        classes = (await self._model_info())["gender_classes"]
        step = SETTINGS.max_batch_size
        chunks = await asyncio.gather(
            *(call_dependency(self.model.to_async.predict, crops[i : i + step]) for i in range(0, len(crops), step))
        )
        return answers(np.concatenate(chunks), classes, SETTINGS.interval_level)

    async def _photos(self, paths: list[Path]) -> list[PhotoResult] | JSONResponse:
        # at most one image per detector process in flight for this request: a request with many large
        # photos then queues behind nobody and nobody queues behind all of its photos
        slots = asyncio.Semaphore(DETECTOR_WORKERS)

        async def detect(path: Path) -> dict:
            async with slots:
                return await call_dependency(self.detector.to_async.detect, await asyncio.to_thread(path.read_bytes))

        detections = await asyncio.gather(*(detect(p) for p in paths))
        for i, d in enumerate(detections):
            if "error" in d:
                return error(d["status"], d["error"] if len(paths) == 1 else f"image #{i}: {d['error']}")
        attrs = await self._attributes(np.concatenate([d["crops"] for d in detections]))
        results, k = [], 0
        for d in detections:
            faces = []
            for (x, y, w, h), score in zip(d["boxes"], d["scores"], strict=True):
                box = {"x": x, "y": y, "width": w, "height": h}
                faces.append(DetectedFace(box=box, detection_score=round(score, 4), **attrs[k]))
                k += 1
            results.append(PhotoResult(width=d["width"], height=d["height"], faces=faces))
        return results

    @bentoml.api
    async def predict(self, image: Path) -> PhotoResult:
        """Every face in one photo: box, age, gender. Multipart field `image`."""
        results = await self._photos([image])
        return results if isinstance(results, JSONResponse) else results[0]

    @bentoml.api
    async def predict_batch(self, images: list[Path]) -> BatchResult:
        """Several photos in one request (multipart field `images`, repeated); results in request order."""
        results = await self._photos(images)
        return results if isinstance(results, JSONResponse) else BatchResult(results=results)

    @bentoml.api
    async def predict_faces(self, images: list[Path]) -> FacesResult:
        """Already-cropped faces (e.g. UTKFace crops), no detection; multipart field `images`."""
        loaded = await call_dependency(self.detector.to_async.load_crops, [p.read_bytes() for p in images])
        if "error" in loaded:
            return error(loaded["status"], loaded["error"])
        return FacesResult(predictions=[FaceAttributes(**a) for a in await self._attributes(loaded["crops"])])

    @bentoml.api
    async def annotate(self, image: Path) -> Image.Image:
        """The photo as PNG with every face boxed and labelled (`34 · female 92 %`); multipart field `image`."""
        results = await self._photos([image])
        if isinstance(results, JSONResponse):
            return results
        rgb = await asyncio.to_thread(decode_image, image.read_bytes(), SETTINGS.max_pixels)
        return Response(await asyncio.to_thread(annotate, rgb, results[0]), media_type="image/png")

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        """The loaded model: tag, backbone, input size, training data (demo or UTKFace), test metrics."""
        info = await self._model_info()
        return ModelInfo(**{k: v for k, v in info.items() if k != "gender_classes"})


async def model_card(request) -> Response:
    """GET /model_card: the served model's card (Markdown), written by `training export`."""
    path = Path(AgeGenderModel.model_ref.path) / CARD_FILE
    if not path.is_file():
        message = f"model {AgeGenderModel.model_ref.tag} has no model card: it was exported before cards were written"
        return JSONResponse({"error": message}, status_code=404)
    return Response(path.read_text(), media_type="text/markdown; charset=utf-8")


AgeGender.mount_asgi_app(StaticFiles(directory=UI, html=True), path="/ui", name="ui")
AgeGender.mount_asgi_app(Starlette(routes=[Route("/", model_card)]), path="/model_card", name="model_card")
AgeGender.add_asgi_middleware(
    RequestGuard,
    routes=ROUTES,
    max_bytes=SETTINGS.max_bytes,
    max_images=SETTINGS.max_images,
    max_pixels=SETTINGS.max_pixels,
    max_request_pixels=SETTINGS.max_request_pixels,
    idle_timeout=SETTINGS.idle_timeout,
    upload_timeout=SETTINGS.upload_timeout,
    no_input_routes=("/model_info",),
)
AgeGender.add_asgi_middleware(StandardOpenAPI)
