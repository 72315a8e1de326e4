"""Service settings, read from environment variables so that one container image fits many deployments."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from models.artifact import INTERVAL_LEVEL, MODEL_NAME, check_tag, stored_model
from models.errors import FALSE, TRUE, UserError, debugging
from models.faces import DetectorConfig, detector_name
from models.images import MAX_PIXELS
from models.outputs import check_level
from models.runtime import cpu_cores, runtime_name
from serving.edge import cors_origins

PREFIX = "AGE_GENDER_"


@dataclass(frozen=True)
class Settings:
    model: str = f"{MODEL_NAME}:latest"  # store tag the bento pins at build time
    # face detection: models.faces.DetectorConfig says what each means and why its default
    detector: str = DetectorConfig.detector
    score_threshold: float = DetectorConfig.score_threshold
    min_face_size: int = DetectorConfig.min_face_size
    small_faces: bool = DetectorConfig.small_faces
    max_faces: int = DetectorConfig.max_faces
    max_bytes: int = 20 * 1024 * 1024  # per request -> 413
    max_pixels: int = MAX_PIXELS  # per image, checked before decoding -> 413
    max_images: int = 32  # files per request -> 413
    # decoded pixels per request, summed over its images and read from their headers before decoding -> 413;
    # 100 Mpx is about 300 MB of decoded RGB, e.g. eight 12 Mpx photos in one /predict_batch
    max_request_pixels: int = 100_000_000
    # seconds without a byte of the request body -> 408 (slow or stalled clients); and for a caller to take
    # in each 64 KiB of a large answer, else the rest is dropped (serving/disconnect.py, SlowReaders)
    idle_timeout: float = 10.0
    upload_timeout: float = 60.0  # seconds to receive a whole request body -> 408
    # after idle_timeout seconds, a body arriving slower than this on average -> 408: clients that hold an
    # upload open with a byte now and then; 1 KiB/s is far below any phone network (2G: ~10 KiB/s)
    min_upload_rate: float = 1024.0
    # per API process (serving/guard.py): bodies being received at once, and requests being handled
    # (counted from a complete, checked body) -> 429 past either
    max_uploads: int = 256
    max_concurrency: int = 128
    runtime: str = "auto"  # auto | onnx | onnx-int8 | torch (models/runtime.py)
    max_batch_size: int = 32  # adaptive batching upper bound; 1 turns batching off
    max_latency_ms: int = 20000  # adaptive batching: a request that would queue longer gets 503
    detector_workers: int = 0  # face-detection processes; 0 = one per CPU core (cgroup limits respected)
    api_workers: int = 1  # processes of the public API (async: one serves many requests)
    interval_level: float = INTERVAL_LEVEL  # level of the central age interval in every answer, 0.5-0.98
    api_key: str = field(default="", repr=False)  # required of every request but health checks when set
    cors_origins: str = ""  # comma-separated origins browsers may call the API from (`*`: any); off when empty
    # read where errors are answered (models.errors.debugging, below serving); here so that a value that is
    # no switch (AGE_GENDER_DEBUG=maybe) stops the service instead of meaning off
    debug: bool = False

    @property
    def detection(self) -> DetectorConfig:
        return DetectorConfig(**{f.name: getattr(self, f.name) for f in fields(DetectorConfig)})

    def __post_init__(self) -> None:
        try:
            check_level(self.interval_level)
        except ValueError as exc:
            raise UserError(f"{PREFIX}INTERVAL_LEVEL: {exc}") from exc
        at_least = {name: 1 for name in _COUNTS} | {"min_upload_rate": 0, "detector_workers": 0, "max_latency_ms": 1}
        for name, low in at_least.items():
            if not getattr(self, name) >= low:  # nan too
                raise UserError(f"{PREFIX}{name.upper()} must be at least {low}, not {getattr(self, name)}")
        for name in ("idle_timeout", "upload_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"{PREFIX}{name.upper()} must be more than 0 seconds, not {getattr(self, name)}")
        if self.api_key != self.api_key.strip():  # HTTP strips a header's value: no client's key could match
            raise UserError(f"{PREFIX}API_KEY starts or ends with whitespace (a newline, from a file?): remove it")
        checks = (
            ("model", check_tag),
            ("detector", detector_name),
            ("runtime", runtime_name),
            ("cors_origins", cors_origins),
        )
        for name, check in checks:
            try:
                check(getattr(self, name))
            except UserError as exc:
                raise UserError(f"{PREFIX}{name.upper()}: {exc}") from exc
        try:  # the detection settings' own checks, whose messages start with the setting's name
            self.detection  # noqa: B018
        except UserError as exc:
            name, rest = str(exc).split(" ", 1)
            raise UserError(f"{PREFIX}{name.upper()} {rest}") from exc

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            default: Any = f.default
            raw = os.environ.get(PREFIX + f.name.upper())
            if not raw:  # unset, or set but empty (`AGE_GENDER_X=` in a compose file): the default
                continue
            try:
                values[f.name] = _boolean(raw) if isinstance(default, bool) else type(default)(raw)
            except ValueError as exc:
                raise UserError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from exc
        return cls(**values)


# settings that count something (bytes, pixels, files, requests, processes): 0 or less makes no sense
_COUNTS = (
    "max_uploads",
    "max_concurrency",
    "max_bytes",
    "max_pixels",
    "max_images",
    "max_request_pixels",
    "max_batch_size",
    "api_workers",
)


def _boolean(raw: str) -> bool:
    if raw.strip().lower() in TRUE:
        return True
    if raw.strip().lower() in FALSE:
        return False
    raise ValueError(raw)


def _stop(exc: UserError) -> NoReturn:
    """A setting that cannot work stops the service in one line (with AGE_GENDER_DEBUG, its traceback)."""
    if debugging():
        raise exc
    raise SystemExit(f"error: {exc}") from None


def model_in_store(tag: str) -> None:
    """Stops the service in one line unless the local store (or the Bento's) holds AGE_GENDER_MODEL's tag: a
    model service that cannot load its model would restart over and over behind a /readyz answering 500.
    A model only on BentoCloud, which BentoML would fetch, is refused too: this project serves local ones."""
    try:
        stored_model(tag)
    except UserError as exc:
        _stop(UserError(f"{PREFIX}MODEL: {exc}"))


try:
    SETTINGS = Settings.from_env()
except UserError as exc:  # every process of the service reads them: a bad one stops it in one line
    _stop(exc)


DETECTOR_WORKERS = SETTINGS.detector_workers or cpu_cores()
