"""`cifarcnn serve`: an HTTP API (and a page at /) that classifies uploaded images with a trained checkpoint.

Answers are `cifarcnn predict`'s: the model is loaded by `predict.load_model`, uploads are decoded by
`images.read_image` (the same function predict uses on files, on a thread pool) and classified by
`LoadedModel.classify` (the one inference path), in batches gathered from concurrent requests (`batching`).
Requests carry image bytes only: nothing in a request names a file on the server. An `.onnx` file
(`cifarcnn export`) is served the same way through ONNX Runtime (`runtime.load_onnx`), without torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.util
import ipaddress
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from ..base.errors import UsageError, UserError

if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None or \
        importlib.util.find_spec("python_multipart") is None and \
        importlib.util.find_spec("multipart") is None:
    raise UserError("cifarcnn serve needs the `serve` extra (FastAPI, uvicorn, python-multipart): "
                    "pip install 'cifarcnn[serve]'")

import uvicorn  # noqa: E402
from fastapi import FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from fastapi.security.utils import get_authorization_scheme_param  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.types import Receive, Scope, Send  # noqa: E402

from .. import __version__  # noqa: E402
from ..base.config import closest_preset  # noqa: E402
from ..data.images import read_image  # noqa: E402
from .batching import Batcher  # noqa: E402
from .runtime import OnnxModel, check_device, file_digest, is_onnx, load_onnx  # noqa: E402

if TYPE_CHECKING:  # serving an .onnx file never imports torch, which .predict imports
    from .predict import LoadedModel

MAX_BODY_MB = 20
MAX_UPLOADS = 32  # request bodies in memory at once; more get 503
# an upload with more pixels is refused before decoding (Pillow warns at 89M, fails at 179M)
MAX_PIXELS = 40_000_000
TOKEN_ENV = "CIFARCNN_TOKEN"
OPEN_PATHS = ("/", "/healthz", "/docs", "/openapi.json")  # need no token: they hold no model output
FIELD = "file"
TOP_K = Query(ge=1, description="classes per image, at most the number of classes (default 3)")


@dataclass(frozen=True)
class ServeOptions:
    """How `serve` listens and batches."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_wait_ms: float = 5.0
    token: str | None = None
    max_body_mb: float = MAX_BODY_MB
    max_uploads: int = MAX_UPLOADS
    decode_workers: int = 4


# --------------------------------------------------------------------------- what the model is


def _saved_test_accuracy(loaded: LoadedModel, path: Path, checkpoint_in: Path, key: str) -> float | None:
    """The accuracy under `key` in the JSON file `path` when it was measured on this checkpoint file (its
    "checkpoint", relative to `checkpoint_in`), epoch and TTA level; else None."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(path.read_text())
        same_file = (checkpoint_in / saved["checkpoint"]).resolve() == loaded.path.resolve()
        if same_file and (saved.get("epoch"), saved.get("tta")) == (loaded.checkpoint.get("epoch"),
                                                                    loaded.settings.tta):
            return float(saved[key])
    return None


def _class_figures(loaded: LoadedModel) -> dict:
    """The class counts per side the checkpoint records (None before cifarcnn recorded them), the metric its
    best epoch was picked by, the last epoch's validation balanced accuracy, and the test balanced accuracy
    and macro-F1 when measured for this checkpoint (as the test accuracy)."""
    checkpoint, run, figures = loaded.checkpoint, loaded.path.parent, {}
    keys = (("test_balanced_accuracy", "test_balanced_acc", "balanced_accuracy"),
            ("test_macro_f1", "test_macro_f1", "macro_f1"))  # /v1/model, test.json, test_metrics.json
    for key, in_test_json, in_evaluate in keys:
        figures[key] = _saved_test_accuracy(loaded, run / "test.json", run, in_test_json)
        if figures[key] is None:
            figures[key] = _saved_test_accuracy(loaded, run / "eval" / "test_metrics.json", Path.cwd(),
                                                in_evaluate)
    return {"class_counts": checkpoint.get("class_counts"), "monitor": checkpoint.get("monitor", "accuracy"),
            "validation_balanced_accuracy": (checkpoint.get("history") or [{}])[-1].get("val_balanced_acc"),
            **figures}


def _accuracies(loaded: LoadedModel) -> tuple[float | None, float | None]:
    """The checkpoint's validation accuracy, and its test accuracy when one was measured for this checkpoint,
    epoch and TTA level: by `train --test` (RUN/test.json), else by `evaluate`
    (RUN/eval/test_metrics.json)."""
    history = loaded.checkpoint.get("history") or [{}]
    run = loaded.path.parent
    test = _saved_test_accuracy(loaded, run / "test.json", run, "test_acc")
    if test is None:
        test = _saved_test_accuracy(loaded, run / "eval" / "test_metrics.json", Path.cwd(), "test_accuracy")
    return history[-1].get("val_acc"), test


def describe_model(loaded: LoadedModel) -> tuple[dict, dict]:
    """(identity, details): what every prediction names, and what GET /v1/model answers."""
    preset, overrides = closest_preset(loaded.checkpoint["config"])
    identity = {"run": loaded.path.parent.name, "checkpoint": loaded.path.name,
                "digest": file_digest(loaded.path), "preset": preset, "preset_overrides": overrides,
                "tta": loaded.settings.tta, "precision": loaded.settings.precision}
    val, test = _accuracies(loaded)
    details = {**identity, "architecture": loaded.checkpoint["model"],
               "epoch": loaded.checkpoint.get("epoch"),
               "dataset": loaded.checkpoint.get("dataset", "CIFAR-10"), "classes": loaded.classes,
               "image_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std),
               "validation_accuracy": val, "test_accuracy": test, **_class_figures(loaded),
               "inference": loaded.settings.describe(), "device": str(loaded.device),
               # null: uncalibrated (plain softmax); else the temperature the probabilities are divided by
               "calibration": loaded.checkpoint.get("calibration"),
               "probabilities": loaded.settings.describe_probabilities()}
    return identity, details


def describe_onnx(model: OnnxModel) -> tuple[dict, dict]:
    """`describe_model` for an exported file, from its metadata (the accuracies its `--int8` check measured
    when it has them)."""
    meta = model.meta
    identity = {"run": Path(meta.get("source_checkpoint", "")).parent.name, "checkpoint": model.path.name,
                "digest": file_digest(model.path), "preset": meta.get("preset") or None,
                "preset_overrides": json.loads(meta.get("preset_overrides", "{}")),
                "tta": model.tta, "precision": model.weights}
    check = json.loads(meta.get("int8_check", "{}"))
    measured = check.get("side") == "test" and check.get("tta") == model.tta  # by `export --int8`
    val = meta.get("best_val_acc", "None")
    details = {**identity, "architecture": meta.get("architecture"),
               "epoch": int(meta["epoch"]) if meta.get("epoch", "None").isdigit() else None,
               "dataset": meta.get("dataset"), "classes": model.classes, "image_size": model.image_size,
               "mean": list(model.mean), "std": list(model.std),
               "validation_accuracy": None if val == "None" else float(val),
               "test_accuracy": check["int8_accuracy"] if measured else None,
               "inference": model.describe(), "device": "cpu (ONNX Runtime)",
               "checkpoint_digest": meta.get("checkpoint_digest"), "temperature": model.temperature,
               # as a checkpoint's /v1/model: null when the export holds no temperature (plain softmax)
               "calibration": {"temperature": model.temperature} if "temperature" in meta else None}
    return identity, details


# --------------------------------------------------------------------------- response shapes (for /docs)


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    label: str = Field(alias="class", description="class name")
    probability: float


class ImageResult(BaseModel):
    name: str = Field(description="the upload's file name, or 'body' for a raw request body")
    predictions: list[Prediction] = Field(description="the top classes, most likely first")


class ModelIdentity(BaseModel):
    run: str
    checkpoint: str
    digest: str
    preset: str | None
    preset_overrides: dict
    tta: int
    precision: str


class PredictResponse(BaseModel):
    model: ModelIdentity
    results: list[ImageResult]


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
        FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                "description": "one or more image files (PNG, JPEG, BMP, GIF, WebP)"},
        "top_k": {"type": "integer", "description": "classes per image (default 3)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "one image as the raw body"}}}}}


# ----------------------------------------------------------------------- the guard: host, token, path, body


async def _send_json(send: Send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of the app. In this order: without a token, 403 for a request whose Host (or
    Origin) header names anything but loopback or the configured host (a DNS-rebinding page, another site's
    form); with a token, 401 for a request without `Authorization: Bearer <token>` (except OPEN_PATHS); 404
    for a path the app does not serve; 413 for a body over `max_body` bytes, declared or streamed, read no
    further; 503 with Retry-After while `max_uploads` request bodies are already in progress. Nothing is read
    of a refused body."""

    def __init__(self, app: FastAPI, options: ServeOptions):
        self.app, self.token, self.host = app, options.token, options.host.lower()
        self.max_body = int(options.max_body_mb * 2**20)
        self.too_big = f"request body over the {options.max_body_mb:g} MB limit"
        self.paths = {route.path for route in app.routes}
        self.uploads = threading.BoundedSemaphore(options.max_uploads)

    def _refusal(self, scope: Scope, headers: dict) -> tuple[int, str, tuple] | None:
        """(status, detail, headers) of the answer that refuses the request before its body, or None."""
        if not self.token:
            host, origin = headers.get(b"host", b""), headers.get(b"origin")
            for name, value, url in (("Host", host, b"//" + host), ("Origin", origin, origin)):
                if value is not None and not self._local(url):
                    return 403, (f"{name} header {value.decode('latin-1')!r} is not this server's: without a "
                                 f"token it answers only requests to localhost, 127.0.0.1, [::1] or its "
                                 f"--host; start it with --token to accept others"), ()
        elif scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return 401, ("missing or wrong token: send the header 'Authorization: Bearer <token>' with the "
                         "token the server was started with"), ((b"www-authenticate", b"Bearer"),)
        if scope["path"] not in self.paths:
            return 404, "Not Found", ()
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return 400, "bad Content-Length header", ()
        if int(declared) > self.max_body:
            return 413, self.too_big, ()
        return None

    def _local(self, url: bytes) -> bool:
        with contextlib.suppress(ValueError):
            name = urlsplit(url.decode("latin-1")).hostname
            return name is not None and (name == self.host or is_loopback(name))
        return False

    def _authorized(self, headers: dict) -> bool:
        scheme, given = get_authorization_scheme_param(headers.get(b"authorization", b"").decode("latin-1"))
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode("latin-1"),
                                                                  self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _send_json(send, *refusal)
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body
        if not self.uploads.acquire(blocking=False):
            return await _send_json(send, 503, "too many uploads in progress: try again in a second",
                                    ((b"retry-after", b"1"),))
        try:
            await self._with_body(scope, receive, send)
        finally:
            self.uploads.release()

    async def _with_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body, stopping as soon as it is over the limit (413), then run the app on it."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_json(send, 413, self.too_big)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------- the app


async def _uploads(request: Request) -> tuple[list[tuple[str, bytes]], str | None]:
    """The uploaded images as (name, bytes) and the form's top_k, from a multipart form (field FIELD,
    repeated) or from the raw body (one image)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1000, max_fields=100)
        except Exception as e:  # a malformed form: python-multipart's errors vary
            raise HTTPException(400, f"malformed multipart form ({type(e).__name__}: {e})") from None
        fields = form.getlist(FIELD)
        if not fields:
            raise HTTPException(400, f"missing field {FIELD!r}: send each image as a multipart form file "
                                     f"named {FIELD!r}, or one image as the raw request body")
        if not all(isinstance(f, UploadFile) for f in fields):
            raise HTTPException(400, f"field {FIELD!r} must be a file upload, not text")
        top_k = form.get("top_k")
        return [(f.filename or f"{FIELD}{i + 1}", await f.read()) for i, f in enumerate(fields)], \
            top_k if isinstance(top_k, str) else None
    body = await request.body()
    if not body:
        raise HTTPException(400, f"empty request body: send one image as the body, or multipart form files "
                                 f"named {FIELD!r}")
    return [("body", body)], None


def _top_k(query: int | None, form: str | None, classes: int) -> int:
    """Classes per image: the query's top_k (FastAPI validated it), else the form's (validated the same way),
    else 3; a 400 above the number of classes."""
    top_k = query
    if top_k is None and form is not None:
        try:
            top_k = TypeAdapter(Annotated[int, TOP_K]).validate_strings(form)
        except ValidationError as e:
            raise RequestValidationError([{**e.errors()[0], "loc": ("form", "top_k")}]) from None
    if top_k is not None and top_k > classes:
        raise HTTPException(400, f"bad top_k {top_k}: at most {classes}, the number of classes")
    return min(3, classes) if top_k is None else top_k


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """A parameter FastAPI found invalid (top_k): a 400 naming it, as one line like the other errors."""
    wrong = error.errors()[0]
    return JSONResponse({"detail": f"bad {wrong['loc'][-1]} {wrong.get('input')!r}: {wrong['msg']}"},
                        status_code=400)


def create_app(loaded: LoadedModel | OnnxModel, options: ServeOptions) -> FastAPI:
    """The FastAPI app for one loaded model; its lifespan starts and stops the batcher and the decoding pool.
    `app.state.batcher` is the Batcher (its `batch_sizes` show how requests were batched)."""
    identity, details = describe_onnx(loaded) if isinstance(loaded, OnnxModel) else describe_model(loaded)
    batcher = Batcher(lambda images: loaded.classify(images, len(loaded.classes)), options.max_batch,
                      options.max_wait_ms / 1000)
    decoders = ThreadPoolExecutor(options.decode_workers, thread_name_prefix="cifarcnn-decode")
    page = (resources.files("cifarcnn.use") / "serve_page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()
        decoders.shutdown()

    app = FastAPI(title="cifarcnn serve", version=__version__, lifespan=lifespan,
                  description="Classify images with a trained cifarcnn checkpoint; answers equal `cifarcnn "
                              "predict`'s for the same file.")
    app.state.batcher = batcher

    async def classify(name: str, data: bytes, top_k: int) -> dict:
        decoded = await asyncio.get_running_loop().run_in_executor(
            decoders, read_image, data, loaded.image_size, MAX_PIXELS)
        if isinstance(decoded, str):
            raise HTTPException(422, f"{name}: {decoded}")
        ranked = await batcher.submit(decoded)
        return {"name": name, "predictions": [{"class": c, "probability": p} for c, p in ranked[:top_k]]}

    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY,
              summary="classify one or more images")
    async def predict(request: Request, top_k: Annotated[int | None, TOP_K] = None) -> dict:
        uploads, form_top_k = await _uploads(request)
        k = _top_k(top_k, form_top_k, len(loaded.classes))
        results = await asyncio.gather(*(classify(name, data, k) for name, data in uploads))
        return {"model": identity, "results": list(results)}

    @app.get("/v1/model", summary="the model: classes, input, accuracy, inference settings")
    async def model() -> dict:
        return details

    @app.get("/healthz", summary="liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    app.add_exception_handler(RequestValidationError, _invalid)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:  # logged by uvicorn, not sent
        return JSONResponse({"detail": f"internal error ({type(error).__name__})"}, status_code=500)

    return app


# --------------------------------------------------------------------------- the command


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT or SIGTERM as usual (no new connections, requests in flight
    answered) but without re-raising the signal afterwards: a requested stop exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_options(options: ServeOptions) -> None:
    """UsageError for an option out of range, or a non-loopback address without a token."""
    if not 0 <= options.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {options.port}")
    if options.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {options.max_batch}")
    if options.max_wait_ms < 0:
        raise UsageError(f"--max-wait-ms must be 0 or more, got {options.max_wait_ms:g}")
    if options.max_body_mb <= 0:
        raise UsageError(f"--max-body-mb must be more than 0, got {options.max_body_mb:g}")
    if options.max_uploads < 1:
        raise UsageError(f"--max-uploads must be at least 1, got {options.max_uploads}")
    if not is_loopback(options.host) and not options.token:
        raise UsageError(f"refusing to listen on {options.host} without a token: anyone who can reach it "
                         f"could use the model. Give --token TOKEN (or set {TOKEN_ENV}), or listen on "
                         f"127.0.0.1")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a one-line UsageError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UsageError(f"--host {host}: not an address this machine can listen on ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def make_server(loaded: LoadedModel | OnnxModel, options: ServeOptions
                ) -> tuple[uvicorn.Server, socket.socket, FastAPI]:
    """A uvicorn server for the model behind the Guard, its listening socket (`server.run(sockets=[sock])`)
    and the app."""
    app = create_app(loaded, options)
    sock = listen(options.host, options.port)
    config = uvicorn.Config(Guard(app, options), log_level="info",
                            access_log=False, timeout_graceful_shutdown=60, lifespan="on")
    return _Server(config), sock, app


def serve(target: str | Path, options: ServeOptions, *, device: str | None = None,
          tta: int | None = None) -> int:
    """The `serve` command: load the checkpoint, listen, answer until SIGINT or SIGTERM; returns the exit
    code."""
    options = ServeOptions(**{**options.__dict__,
                              "token": options.token or os.environ.get(TOKEN_ENV) or None})
    check_options(options)
    # The forward pass shares the CPU with the event loop and the decoders; with every core in the model's
    # thread pool they contend (docs/serve.md).
    threads = max(1, (os.cpu_count() or 1) - 1)
    if is_onnx(target):
        check_device(device)
        loaded = load_onnx(target, tta, threads)
    else:
        import torch

        from .predict import load_model

        loaded = load_model(target, device, tta)
        if loaded.device.type == "cpu":
            torch.set_num_threads(threads)
    server, sock, _ = make_server(loaded, options)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    inference = loaded.describe() if isinstance(loaded, OnnxModel) else loaded.settings.describe()
    print(f"serving {loaded.path} ({len(loaded.classes)} classes; {inference}) on "
          f"http://{shown}:{port}/ (API docs: /docs){'; token required' if options.token else ''}",
          flush=True)
    if not isinstance(loaded, OnnxModel):  # an export's describe() names its temperature
        print(loaded.settings.describe_probabilities(), flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise UserError("the server did not start (see the log above)")
    print("stopped", flush=True)
    return 0
