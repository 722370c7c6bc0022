"""serve: a model directory behind KServe's Python model server (``kserve.ModelServer``), the server
a KServe InferenceService runs in its predictor container.

The model loads as ``predict`` loads it (``predict.load_model``: model.onnx with onnxruntime, model.pt2
when there is none, or the checkpoint) and answers at the threshold ``predict`` uses (the model's own
validation-chosen rule, or ``--threshold-rule``). Encoded images are decoded by ingest's decoder
(``validation.check_image``: grayscale, resized to the model's size, the same pixel limit), so the same
file gets the same probability from ``predict`` and from the server.

Endpoints (``NAME``: ``--name``, default ``pneumonia``):

- Open Inference Protocol v2: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME`` (metadata),
  ``/v2/models/NAME/ready``; ``POST /v2/models/NAME/infer`` with one input, either
  ``BYTES [N]`` (encoded image files, base64 strings in JSON: KServe's REST server cannot take non-UTF-8
  BYTES in the binary extension) or ``UINT8 [N, 1, S, S]`` (decoded 8-bit grayscale images of the model's
  size S, what model.onnx takes; JSON or the binary extension).
  Outputs: ``probability`` FP32 [N] (P(positive class)) and ``label`` BYTES [N]; parameters: threshold,
  threshold_rule, model_id.
- KServe v1: ``POST /v1/models/NAME:predict`` with ``{"instances": [{"b64": "..."}, ...]}`` (also
  ``{"image_bytes": {"b64": ...}}`` or a bare base64 string), answered ``{"predictions": [{"probability",
  "label"}, ...], "threshold", "threshold_rule", "model_id"}``.
- Prometheus metrics on ``GET /metrics`` (KServe's request_{preprocess,predict,postprocess}_seconds
  histograms per model, and the process's own).

A request the model cannot answer gets a 4xx with ``{"error": reason}`` (FastAPI's 422 with ``detail``
for a v2 body that is not an inference request) and the server carries on.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import uuid
from pathlib import Path

import numpy as np

from pneumonia_kfp.errors import UsageError

DEFAULT_NAME = "pneumonia"
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_MB = 64
MAX_IMAGES = 64  # a request; bounds the decoding work one request can ask for
BAD_V1 = 'send {"instances": [{"b64": "<base64 of an image file>"}, ...]}'


class ServeError(UsageError):
    """A port or request limit that serve cannot use."""


def _invalid(reason: str) -> Exception:
    from kserve.errors import InvalidInput

    return InvalidInput(reason)


def _base64(text, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _invalid(f"{where}: not base64; encode each image file's bytes as base64") from None


def _count(n: int) -> int:
    if n < 1 or n > MAX_IMAGES:
        raise _invalid(f"{n} images: send 1 to {MAX_IMAGES} images a request")
    return n


class ImageModel:
    """The arrays behind both protocols: encoded images or uint8 tensors in, P(positive) and labels out."""

    def __init__(self, model_dir: str | Path, engine: str = "onnx", rule: str | None = None):
        from pneumonia_kfp.params import max_pixels
        from pneumonia_kfp.predict import load_model, threshold_for

        self.model = load_model(model_dir, engine)
        self.rule, self.threshold = threshold_for(self.model, rule)
        self.max_pixels = max_pixels()

    @property
    def size(self) -> int:
        return self.model.image_size

    def decode(self, files: list[bytes], where: str) -> np.ndarray:
        """uint8 N×1×S×S of encoded image files, decoded as ingest decodes them; a 4xx naming the first bad one."""
        from pneumonia_kfp.validation import check_image

        images = []
        for k, data in enumerate(files):
            image, reason = check_image(data, self.size, self.max_pixels)
            if reason:
                raise _invalid(f"{where}[{k}]: {reason}")
            images.append(image)
        return np.stack(images)[:, None]

    def tensor(self, array: np.ndarray, where: str) -> np.ndarray:
        expected = (array.shape[0] if array.ndim else 0, 1, self.size, self.size)
        if array.shape != expected or array.shape[0] < 1:
            raise _invalid(f"{where}: shape {list(array.shape)}; send UINT8 [N, 1, {self.size}, {self.size}] "
                           f"(N grayscale {self.size}x{self.size} images), or encoded images as BYTES [N]")
        return np.ascontiguousarray(array, dtype=np.uint8)

    def answer(self, images: np.ndarray) -> tuple[list[float], list[str]]:
        from pneumonia_kfp.predict import label

        probabilities = [float(p) for p in self.model.run(images)]
        return probabilities, [label(self.model, p, self.threshold) for p in probabilities]

    def about(self) -> dict:
        return {"threshold": self.threshold, "threshold_rule": self.rule, "model_id": self.model.model_id}

    # --- the two protocols' requests ---------------------------------------------------------------------

    def v2_images(self, request) -> np.ndarray:
        if len(request.inputs) != 1:
            raise _invalid(f"{len(request.inputs)} inputs: send one, BYTES [N] (encoded images) or UINT8 "
                           f"[N, 1, {self.size}, {self.size}]")
        tensor = request.inputs[0]
        where, shape = f"input {tensor.name!r}", [int(d) for d in tensor.shape]
        if tensor.datatype not in ("BYTES", "UINT8"):
            raise _invalid(f"{where}: datatype {tensor.datatype}; send BYTES [N] (encoded images) or UINT8 "
                           f"[N, 1, {self.size}, {self.size}]")
        _count(shape[0] if shape else 0)
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError, OverflowError) as e:
            raise _invalid(f"{where}: its data do not make a {tensor.datatype} tensor of shape {shape} ({e})") \
                from None
        if tensor.datatype == "UINT8":
            return self.tensor(array, where)
        if array.ndim != 1:
            raise _invalid(f"{where}: shape {shape}; send BYTES of shape [N], one encoded image each")
        files = [_base64(f, f"{where}[{k}]") for k, f in enumerate(array.tolist())]
        return self.decode(files, where)

    def v1_images(self, body) -> np.ndarray:
        if isinstance(body, bytes):  # a JSON body sent without its content type (curl -d)
            try:
                body = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise _invalid(f"the body is not JSON ({e}): {BAD_V1}") from None
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list):
            raise _invalid(f"no \"instances\" list: {BAD_V1}")
        _count(len(instances))
        files = []
        for k, item in enumerate(instances):
            if isinstance(item, dict) and isinstance(item.get("image_bytes"), dict):
                item = item["image_bytes"]
            text = item.get("b64") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise _invalid(f"instances[{k}]: {BAD_V1}")
            files.append(_base64(text, f"instances[{k}]"))
        return self.decode(files, "instances")


def kserve_model(name: str, images: ImageModel):
    """``images`` as a ``kserve.Model`` named ``name`` (kserve imported only here: it is a large import)."""
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class PneumoniaModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.ready = True  # loaded already: a model that does not load stops serve before it listens

        def get_input_types(self) -> list[dict]:
            s = images.size
            return [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, s, s]},
                    {"name": "image_files", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict]:
            return [{"name": "probability", "datatype": "FP32", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]

        async def predict(self, payload, headers=None):
            # decoding and the model run in the server's worker threads, so health checks and
            # other requests are answered meanwhile
            return await asyncio.get_running_loop().run_in_executor(None, self._predict, payload)

        def _predict(self, payload):
            if isinstance(payload, InferRequest):
                p, labels = images.answer(images.v2_images(payload))
                outputs = [InferOutput("probability", [len(p)], "FP32", np.asarray(p, np.float32)),
                           InferOutput("label", [len(p)], "BYTES", labels)]
                return InferResponse(payload.id or str(uuid.uuid4()), name, outputs, parameters=images.about(),
                                     use_binary_outputs=payload.use_binary_outputs,
                                     requested_outputs=payload.request_outputs)
            p, labels = images.answer(images.v1_images(payload))
            return {"predictions": [{"probability": q, "label": c} for q, c in zip(p, labels, strict=True)],
                    **images.about()}

    return PneumoniaModel()


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused (413) and never held in memory, whether
    it declares its length or comes chunked. Up to ``limit`` bytes more are read and dropped before the
    answer, so a client still sending (most do not wait for 100 Continue) reads the 413 instead of a
    connection reset."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) <= self.limit:
            return await self.app(scope, receive, send)  # the HTTP server stops the body at its length
        if length is not None and headers.get(b"expect", b"").lower() == b"100-continue":
            return await self.refuse(send)  # the client waits for this answer before it sends the body
        chunks, size, more = [], 0, True
        while more and size <= 2 * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body, more = message.get("body", b""), message.get("more_body", False)
            size += len(body)
            if size <= self.limit:
                chunks.append(body)
        if size > self.limit:
            return await self.refuse(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def refuse(self, send) -> None:
        text = json.dumps({"error": f"request body over {self.limit / 2**20:g} MiB (serve --max-request-mb): send "
                                    "fewer or smaller images a request"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(text)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": text})


def _check_port(port: int) -> None:
    """A port that cannot be listened on is one line, before the model server starts (uvicorn would exit)."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: use a port from 1 to 65535")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise ServeError(f"--port {port}: cannot listen there ({e.strerror}); choose another --port") from None


def serve(model_dir: str | Path, port: int = DEFAULT_PORT, name: str = DEFAULT_NAME, engine: str = "onnx",
          rule: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB) -> None:
    """Load the model, then answer on ``port`` (every interface, as in a pod) until stopped."""
    if max_request_mb <= 0:
        raise ServeError(f"--max-request-mb {max_request_mb:g}: use a positive number of MiB")
    _check_port(port)
    images = ImageModel(model_dir, engine, rule)
    import kserve
    from kserve.model_server import app

    app.add_middleware(BodyLimit, limit=int(max_request_mb * 2**20))
    # gRPC off: one port, the one the InferenceService's container declares
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([kserve_model(name, images)])
