"""Age and gender recognition service: `bentoml serve service:AgeGender`.

Three services, each in its own process(es), around the two halves of models/pipeline.py:
- FaceDetection:  FaceFinder: upload bytes -> decoded photo, faces, aligned 200x200 crops (CPU).
- AgeGenderModel: Estimator: aligned crops -> answer rows, adaptive batching across requests (GPU if any).
- AgeGender:      the public HTTP API; fans photos out to the detectors, crops into shared model batches,
                  joins the two; a UserError anywhere is a 400/413/415 `{"error"}` (serving/answers.py).
Settings come from AGE_GENDER_* environment variables (serving/settings.py).
"""

from __future__ import annotations

import os

# Before cv2 (or torch) loads OpenMP (read once per process): no OpenMP thread teams. OpenMP threads spin
# while idle, which starved the model service on 2 cores (BENCHMARKS.md, "Goals of 0.1.0"); each detector
# process is one core's worth of work anyway. ONNX Runtime has its own pool; the torch
# runtime sets its own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio
import logging
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from models.artifact import stored_meta
from models.errors import UserError, about, raised
from models.images import decode_image
from models.outputs import answers
from models.pipeline import Detection, Estimator, FaceFinder, load_crops, photo_results
from models.runtime import visible_gpus
from models.schemas import BatchResult, FaceAttributes, FacesResult, ModelInfo, PhotoResult
from serving import patches
from serving.annotate import annotate as draw_annotations
from serving.answers import answers_user_errors
from serving.card import ModelCardRoute
from serving.dependencies import ByteBudget, call_dependency
from serving.disconnect import SlowReaders, WatchCaller, answer_if_caller_waits
from serving.edge import ApiKey, CallerRequestId, RequestId, cors, log_request_ids
from serving.guard import RequestGuard
from serving.heap import HeapTrimmer, keep_buffers_while_working, return_large_buffers
from serving.openapi import StandardOpenAPI
from serving.routes import api_routes
from serving.settings import DETECTOR_WORKERS, SETTINGS, model_in_store

# inter-service HTTP sessions are otherwise recycled under in-flight requests (BentoML #5540, #5544)
_CONNECTION = {"runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e9}}
patches.apply()  # BentoML 1.4.40: /readyz during worker restarts, per-request timers (serving/patches.py)
return_large_buffers()  # every service process: batches' buffers go back to the OS when freed (serving/heap.py)
log_request_ids()  # log lines written while a request is handled carry its X-Request-ID (serving/edge.py)


# one detector process per CPU core by default: detection is the CPU-bound step of /predict
@bentoml.service(workers=DETECTOR_WORKERS, traffic={"timeout": 60}, **_CONNECTION)
class FaceDetection:
    def __init__(self) -> None:
        keep_buffers_while_working()  # and each call below gives back what a large photo took (serving/heap.py)
        self.heap = HeapTrimmer()  # counts on one call at a time: BentoML's one thread for sync APIs
        self.finder = FaceFinder(SETTINGS.detection, SETTINGS.max_pixels)

    @bentoml.api
    def detect(self, image: bytes) -> dict:
        """Photo bytes -> a models.pipeline.Detection as a dict (or its UserError as data: models.errors)."""
        with self.heap.call():
            return answer_if_caller_waits(lambda: vars(self.finder.find(image)))  # not asdict: it copies the crops

    @bentoml.api
    def annotate(self, image: bytes, result: dict) -> dict:
        """Photo bytes and its PhotoResult as a dict -> {png}: the photo with every face boxed and labelled.
        Here and not in the API process: a photo decoded whole takes up to 3 bytes a pixel (0.15 GB at
        50 Mpx), which the detector processes are sized for, one photo at a time each."""
        with self.heap.call():
            return answer_if_caller_waits(
                lambda: {"png": draw_annotations(decode_image(image, SETTINGS.max_pixels), PhotoResult(**result))}
            )

    @bentoml.api
    def name(self) -> str:
        """The detector in use: the configured one, or `haar` where MTCNN's nets cannot load."""
        return self.finder.name

    @bentoml.api
    def load_crops(self, images: list[bytes]) -> dict:
        """Already-cropped faces -> {crops (N, 200, 200, 3)}, resized as UTKFace chips (or a UserError as data)."""
        with self.heap.call():
            return answer_if_caller_waits(lambda: {"crops": load_crops(images, SETTINGS.max_pixels)})


# BentoML assigns the GPU (CUDA_VISIBLE_DEVICES) when one exists; without one the model runs on the CPU
@bentoml.service(workers=1, resources={"gpu": 1} if visible_gpus() else {}, traffic={"timeout": 60}, **_CONNECTION)
class AgeGenderModel:
    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.meta = stored_meta(self.model_ref)
        self.estimator = Estimator.open(self.model_ref.path, self.meta, SETTINGS.runtime, SETTINGS.interval_level)
        runtime = self.estimator.runtime
        fallback = SETTINGS.runtime == "auto" and (runtime.name, runtime.device) == ("onnx", "cpu")  # not INT8
        # BentoML shows its own logger's lines (the root logger's only from WARNING)
        logging.getLogger("bentoml").log(
            logging.WARNING if fallback else logging.INFO,
            "AgeGenderModel runs %s on %s: %s",
            runtime.name,
            runtime.device,
            self.estimator.why,
        )

    @bentoml.api(
        batchable=SETTINGS.max_batch_size > 1,  # AGE_GENDER_MAX_BATCH_SIZE=1: one request per model call
        batch_dim=0,
        max_batch_size=max(2, SETTINGS.max_batch_size),
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def predict(self, crops: np.ndarray) -> np.ndarray:
        """(B, 200, 200, 3) uint8 aligned crops -> (B, 6) float32: models.outputs.COLUMNS, P(each gender)."""
        return self.estimator(crops)

    @bentoml.api
    def info(self) -> dict:
        return {
            "tag": str(self.model_ref.tag),
            "backbone": self.meta.backbone,
            "image_size": self.meta.image_size,
            "dataset": self.meta.dataset.name,
            "demo": self.meta.demo,
            "test_metrics": self.meta.metrics.get("test", {}),
            "gender_classes": self.estimator.classes,
            "age_head": self.meta.age_head,
            "gender_temperature": self.meta.calibration.gender_temperature,
            **self.estimator.info(),
        }


UI = Path(__file__).resolve().parent / "serving" / "ui"


# no BentoML max_concurrency: it counts requests from before their bodies are read, so slow uploads took
# every slot; the request guard keeps two limits of its own (AGE_GENDER_MAX_UPLOADS, _MAX_CONCURRENCY)
@bentoml.service(workers=SETTINGS.api_workers, traffic={"timeout": 120})
class AgeGender:
    detector = bentoml.depends(FaceDetection)
    model = bentoml.depends(AgeGenderModel)

    @bentoml.on_deployment  # in `bentoml serve`'s own process, before any worker: a missing model stops it
    def check_model() -> None:
        model_in_store(SETTINGS.model)

    def __init__(self) -> None:
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()  # the first burst of requests asks the dependencies once
        # files on their way to the detectors, over all requests: two per detector process keep each one
        # busy, and at most a largest upload's worth of bytes per detector process (ByteBudget says why)
        self._sending = asyncio.Semaphore(2 * DETECTOR_WORKERS)
        self._bytes = ByteBudget(DETECTOR_WORKERS * SETTINGS.max_bytes)

    async def _model_info(self) -> dict:
        async with self._info_lock:
            if self._info is None:
                info, detector = await asyncio.gather(
                    call_dependency(self.model.to_async.info), call_dependency(self.detector.to_async.name)
                )
                self._info = {**info, "detector": detector}
        return self._info

    async def _attributes(self, crops: np.ndarray) -> list[dict]:
        """Crops -> per-face answers; each chunk is one request to the batching model service."""
        if len(crops) == 0:
            return []
        classes = (await self._model_info())["gender_classes"]
        step = SETTINGS.max_batch_size
        chunks = await asyncio.gather(
            *(call_dependency(self.model.to_async.predict, crops[i : i + step]) for i in range(0, len(crops), step))
        )
        return answers(np.concatenate(chunks), classes, SETTINGS.interval_level)

    async def _in_detector(self, method, path: Path, *args) -> dict:
        """method(the photo's bytes, *args) in a detector process, within the bounds on files on their way there."""
        async with self._sending, self._bytes.hold(path.stat().st_size):
            return await call_dependency(method, await asyncio.to_thread(path.read_bytes), *args)

    async def _photos(self, paths: list[Path]) -> list[PhotoResult]:
        # at most one image per detector process in flight for this request: a request with many large
        # photos then queues behind nobody and nobody queues behind all of its photos
        slots = asyncio.Semaphore(DETECTOR_WORKERS)

        async def detect(i: int, path: Path) -> Detection:
            async with slots:
                answer = await self._in_detector(self.detector.to_async.detect, path)
            try:
                return Detection(**raised(answer))
            except UserError as exc:
                raise about(exc, "file", i, len(paths)) from exc

        detections = await asyncio.gather(*(detect(i, p) for i, p in enumerate(paths)))
        return photo_results(detections, await self._attributes(np.concatenate([d.crops for d in detections])))

    @bentoml.api
    @answers_user_errors
    async def predict(self, image: Path) -> PhotoResult:
        """Every face in one photo: box, age and its interval, P(minor), gender. Multipart field `image`."""
        return (await self._photos([image]))[0]

    @bentoml.api
    @answers_user_errors
    async def predict_batch(self, images: list[Path]) -> BatchResult:
        """Several photos in one request (multipart field `images`, repeated); results in request order."""
        return BatchResult(results=await self._photos(images))

    @bentoml.api
    @answers_user_errors
    async def predict_faces(self, images: list[Path]) -> FacesResult:
        """Already-cropped faces (e.g. UTKFace crops), no detection; multipart field `images`."""
        async with self._sending, self._bytes.hold(sum(p.stat().st_size for p in images)):
            data = await asyncio.to_thread(lambda: [p.read_bytes() for p in images])
            loaded = raised(await call_dependency(self.detector.to_async.load_crops, data))
        return FacesResult(predictions=[FaceAttributes(**a) for a in await self._attributes(loaded["crops"])])

    @bentoml.api
    @answers_user_errors
    async def annotate(self, image: Path) -> Image.Image:
        """The photo as PNG with every face boxed and labelled (`34 · female 92 %`); multipart field `image`."""
        (result,) = await self._photos([image])
        drawn = raised(await self._in_detector(self.detector.to_async.annotate, image, result.model_dump()))
        return Response(drawn["png"], media_type="image/png")  # drawn where photos are decoded

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        """The loaded model: tag, backbone, input size, training data (demo or UTKFace), test metrics."""
        info = await self._model_info()
        return ModelInfo(**{k: v for k, v in info.items() if k != "gender_classes"})


FaceDetection.add_asgi_middleware(CallerRequestId)  # their log lines name the request that called
FaceDetection.add_asgi_middleware(WatchCaller, cancel=False)  # a photo whose request is gone is not detected
AgeGenderModel.add_asgi_middleware(CallerRequestId)
ROUTES, NO_INPUT_ROUTES = api_routes(AgeGender)  # every API the guard covers, from the API signatures
AgeGender.mount_asgi_app(StaticFiles(directory=UI, html=True), path="/ui", name="ui")
# BentoML nests middlewares in the order they are added, the first outermost: request IDs and CORS cover
# every answer, and keys are checked before the guard reads a body
AgeGender.add_asgi_middleware(RequestId)
AgeGender.add_asgi_middleware(cors, origins=SETTINGS.cors_origins)
AgeGender.add_asgi_middleware(ApiKey, key=SETTINGS.api_key)
AgeGender.add_asgi_middleware(
    RequestGuard,
    routes=ROUTES,
    max_bytes=SETTINGS.max_bytes,
    max_images=SETTINGS.max_images,
    max_pixels=SETTINGS.max_pixels,
    max_request_pixels=SETTINGS.max_request_pixels,
    idle_timeout=SETTINGS.idle_timeout,
    upload_timeout=SETTINGS.upload_timeout,
    min_upload_rate=SETTINGS.min_upload_rate,
    max_uploads=SETTINGS.max_uploads,
    max_concurrency=SETTINGS.max_concurrency,
    no_input_routes=NO_INPUT_ROUTES,
)
AgeGender.add_asgi_middleware(WatchCaller, cancel=True)  # inside the guard: from a complete body on
# answers callers do not take in; every API route's count of them on /metrics from the start
AgeGender.add_asgi_middleware(SlowReaders, idle_timeout=SETTINGS.idle_timeout, routes=[*ROUTES, *NO_INPUT_ROUTES])
AgeGender.add_asgi_middleware(StandardOpenAPI, max_images=SETTINGS.max_images, api_key=bool(SETTINGS.api_key))
AgeGender.add_asgi_middleware(ModelCardRoute, model=SETTINGS.model)
