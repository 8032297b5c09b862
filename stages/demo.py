r"""A local demo page: pick a fitted model, drop an image or start the camera, see score, verdict and heatmap.

    python -m stages.demo                   # then open http://127.0.0.1:8000
    python -m stages.demo --runtime torch   # the pipeline's own code instead of the exported ONNX graph
    python -m stages.demo --port 8080       # --host 0.0.0.0 to serve other machines (think twice)
    python -m stages.demo --host 0.0.0.0 --ssl-certfile demo-cert.pem --ssl-keyfile demo-key.pem

A browser gives the camera only to a secure page (HTTPS, or http://127.0.0.1 / localhost), so a camera
on another machine (a tablet at the line) needs HTTPS: with --ssl-certfile/--ssl-keyfile the demo serves
HTTPS and the page's live socket becomes wss://. A self-signed certificate for the machine's address
(here 127.0.0.1; put the address the other machine opens, e.g. IP:192.168.1.20), valid for a year:

    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=anomaly-demo" \
        -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout demo-key.pem -out demo-cert.pem

(the browser warns once about a certificate it does not know; accept it for that address).

It scores exactly as `python -m stages.predict` does (the same models of stages/deploy/torch_model.py: the
model's own input recipe), with the same threshold: the deployment file `python -m stages.calibrate`
(or this page's calibrate button) wrote, else evaluate's; the page and the server's log say which.
Two ways in:
- POST /api/predict?model=<category>/<model>: one image as the request body. Larger than
  MAX_UPLOAD_MB: 413, refused on its Content-Length or as soon as the body passes the limit while
  it streams in (nothing is spooled to disk); over the pixel bounds: 413; not an image: 415; an
  image the model fails on (out of memory, a damaged model): 503, each with a one-line JSON error.
- WebSocket /api/live?model=...: camera frames from the page (binary: 8-byte send time + JPEG). The
  server keeps only the newest frame and scores it as soon as the previous one is done, so when
  scoring is slower than the camera, older frames are dropped and the latency stays bounded. A text
  message closes the socket with 1008 (policy violation). With &calibrate=N (&false_alarms, &confidence),
  the next N scored frames are taken as good and set the deployment threshold, by the same code as
  `python -m stages.calibrate`.
Scoring runs in worker threads, one image at a time per model, so the page and /api/models answer
while images are scored. The list of fitted models is read from models/ at start and again whenever
the page asks for it (GET /api/models, on every page load), never per image or camera frame: a model
that `dvc repro` fits while the server runs appears when the page is reloaded. A model or scoring
file that is missing, corrupt or refused answers 503 with its one-line error, as JSON. Binds to
localhost by default; no page loads anything from a CDN (FastAPI's /docs and /redoc are off).
SIGTERM or Ctrl-C stops it within EXIT_DEADLINE_S seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import os
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError
from stages.data.raw import ImageTooLarge
from stages.deploy import deployment
from stages.deploy.batch import describe, image_failures, non_finite
from stages.deploy.overlay import ColourScale, overlay
from stages.deploy.runtimes import RUNTIMES, check_runtime, load_model
from stages.deploy.runtimes import fitted_models as fitted_pairs
from stages.evaluation.threshold import flagged, images_needed, too_few_message

MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_CALIBRATION_FRAMES = 100_000  # one float each: a bound, not a cost
GRACEFUL_SHUTDOWN_S = 2  # open requests and sockets get this long to finish after SIGTERM, then are cancelled
EXIT_DEADLINE_S = 5  # ... and the process ends by then even if a scoring thread never returns
PAGE = Path(__file__).parent / "deploy" / "demo.html"


def fitted_models() -> list[str]:
    """'<category>/<model>' of every model `dvc repro` has fitted and evaluated."""
    return [f"{category}/{name}" for category, name in fitted_pairs()]


def data_url(array: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Loaded:
    """A loaded model with evaluate's threshold and colour scale, and the threshold it applies now."""

    model: object
    evaluate_threshold: float
    evaluate_scale: ColourScale
    line: str = ""
    signature: tuple | None = ()  # the deployment file's (size, mtime) when the threshold was chosen


def file_signature(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


class Models:
    """Each model (and its backbone) loaded once, on first use; one image at a time per model (torch
    and onnxruntime already use every core of the machine's share), in worker threads. The threshold
    follows the model's deployment file: chosen again whenever that file changes."""

    def __init__(self, runtime: str, device: str):
        self.runtime, self.device = runtime, device
        self.names = fitted_models()  # cached: refreshed by refresh() (GET /api/models), not per image
        self.loaded: dict[str, Loaded] = {}
        self.limiters: dict[str, anyio.CapacityLimiter] = {}
        self.lock = threading.Lock()

    def refresh(self) -> list[str]:
        """models/ read again: what the page lists (and the names get() accepts) from now on."""
        self.names = fitted_models()
        return self.names

    def get(self, name: str):
        if name not in self.names:
            raise HTTPException(404, f"model '{name}' is not fitted and evaluated (run dvc repro)")
        with self.lock:
            if name not in self.loaded:
                category, model_name = name.split("/", 1)
                try:
                    model = load_model(category, model_name, self.runtime, self.device)
                except PipelineError as exc:  # a corrupt, refused or missing file: the server's data, said plainly
                    raise HTTPException(503, str(exc)) from None
                self.loaded[name] = Loaded(model, model.threshold, model.colour_scale)
            loaded = self.loaded[name]
            path = deployment.deployment_file(loaded.model.category, loaded.model.name)
            signature = file_signature(path)
            if signature != loaded.signature:
                self.choose(name, loaded, signature)
            return loaded.model

    def choose(self, name: str, loaded: Loaded, signature) -> None:
        """The threshold of the deployment file, if it fits this model; else evaluate's, saying why."""
        model = loaded.model
        try:
            choice = deployment.choose(model, loaded.evaluate_threshold, on_stale="evaluate")
        except PipelineError as exc:  # not a deployment file of ours, or unreadable: never used
            own = f"threshold {loaded.evaluate_threshold:.6g} from {deployment.evaluate_source(model)}"
            choice = deployment.ThresholdChoice(loaded.evaluate_threshold, f"{own}; NOT used: {exc}", None)
        deployment.apply(model, choice, loaded.evaluate_scale)
        loaded.line, loaded.signature = choice.line, signature
        print(f"demo: {name}: {choice.line}", flush=True)

    def line(self, name: str) -> str:
        return self.loaded[name].line

    def calibrate(self, name: str, scores: list[float], false_alarms: float, confidence: float, frames: str) -> dict:
        """The deployment threshold of these good frames' scores: the same record and file as `python -m
        stages.calibrate` (stages/deploy/deployment.py), then used from the next frame on."""
        self.get(name)
        loaded = self.loaded[name]
        record = deployment.build(loaded.model, scores, false_alarms, confidence, frames, loaded.evaluate_threshold)
        path = deployment.write(record)
        self.get(name)  # the file changed: the threshold is chosen again, by the rule predict uses
        return {"threshold": record["threshold"], "file": str(path), "summary": deployment.summary(record),
                "line": self.line(name)}

    def limiter(self, name: str) -> anyio.CapacityLimiter:
        return self.limiters.setdefault(name, anyio.CapacityLimiter(1))

    async def score(self, name: str, data: bytes, label: str, fmt: str = "PNG") -> dict:
        model = await anyio.to_thread.run_sync(self.get, name)
        # abandoned on cancel (a stopping server): the thread's result is dropped, shutdown does not wait for it
        result = await anyio.to_thread.run_sync(score_bytes, model, name, data, label, fmt,
                                                limiter=self.limiter(name), abandon_on_cancel=True)
        return {**result, "threshold_source": self.line(name)}


def score_bytes(model, name: str, data: bytes, label: str, fmt: str) -> dict:
    """One image's bytes -> the page's answer, or HTTPException: 413 too large, 415 not an image it can
    read, 503 an image the model fails on. Other exceptions are programming errors: they propagate."""
    start = time.perf_counter()
    failures = image_failures()
    try:
        image = model.prepare(io.BytesIO(data))
    except ImageTooLarge as exc:
        raise HTTPException(413, f"{label}: {str(exc).split(': ', 1)[1]}") from None
    except PipelineError:
        raise HTTPException(415, f"{label}: not an image that can be read") from None
    except failures as exc:
        raise HTTPException(415, describe(exc, label, "reading")) from None
    try:
        prediction = model.score(image[None], [label])
    except failures as exc:
        raise HTTPException(503, describe(exc, label, "scoring")) from None
    score = float(prediction.image_scores[0])
    if non_finite(score, label):
        raise HTTPException(503, non_finite(score, label))
    heatmap = None
    if prediction.anomaly_maps is not None:
        heatmap = data_url(overlay(image, prediction.anomaly_maps[0], model.colour_scale), fmt)
    return {"model": name, "image": label, "score": score, "threshold": model.threshold,
            "anomalous": bool(flagged(score, model.threshold)), "overlay": heatmap, "input": data_url(image, fmt),
            "ms": round(1000 * (time.perf_counter() - start), 1), "runtime": model.runtime}


async def read_limited(request: Request, label: str) -> bytes:
    """The body, refused with 413 on its declared length or once it streams past the limit."""
    too_large = HTTPException(413, f"{label}: larger than {MAX_UPLOAD_MB} MB", headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise too_large  # before one byte of the body; closing the connection stops the rest
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            raise too_large
    return bytes(body)


class Calibration:
    """The live socket's calibration: the scores of the next `frames` scored frames, taken as good."""

    def __init__(self, frames: int, false_alarms: float, confidence: float):
        self.frames, self.false_alarms, self.confidence = frames, false_alarms, confidence
        self.scores: list[float] = []

    @staticmethod
    def problem(frames: int, false_alarms: float, confidence: float) -> str | None:
        if not (0 < false_alarms < 1 and 0 < confidence < 1):
            return f"calibrate: false_alarms {false_alarms} and confidence {confidence} must be between 0 and 1"
        if frames > MAX_CALIBRATION_FRAMES:
            return f"calibrate: {frames} frames is more than the limit of {MAX_CALIBRATION_FRAMES:,}"
        if frames < images_needed(false_alarms, confidence):
            return f"calibrate: {too_few_message(frames, false_alarms, confidence, 'frames')}"
        return None


def create_app(device: str = "cpu", runtime: str = "onnx") -> FastAPI:
    app = FastAPI(title="Anomaly detection demo", docs_url=None, redoc_url=None, openapi_url=None)
    models = Models(runtime, device)

    @app.exception_handler(Exception)
    async def programming_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not a bad image: a one-line JSON 500 (its traceback goes to the server's log)."""
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the demo's log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text().replace("{max_upload_mb}", str(MAX_UPLOAD_MB))

    @app.get("/api/models")
    def list_models() -> list[str]:
        return models.refresh()

    @app.post("/api/predict")
    async def predict(request: Request, model: str, name: str = "upload") -> dict:
        data = await read_limited(request, name)
        return await models.score(model, data, name)

    @app.websocket("/api/live")
    async def live(websocket: WebSocket, model: str, calibrate: int = 0, false_alarms: float = 0.01,
                   confidence: float = 0.95) -> None:
        await websocket.accept()
        newest: dict = {}
        arrived = asyncio.Event()
        state = {"closed": False, "text": False}

        async def receive() -> None:
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    frame = message.get("bytes")
                    if frame is None:  # a text message: not what the page sends, and not accepted
                        state["text"] = True
                        return
                    if len(frame) > MAX_UPLOAD_BYTES or len(frame) < 9:
                        continue  # not a frame this page sends
                    if newest:
                        newest["dropped"] = newest.get("dropped", 0) + 1  # the older frame is never scored
                    newest.update(sent=struct.unpack("<d", frame[:8])[0], frame=frame[8:])
                    arrived.set()
            finally:  # however the receiving ends, the loop below ends too: no handler waits forever
                state["closed"] = True
                arrived.set()

        async def send(data: dict) -> bool:
            if state["closed"]:
                return False
            try:
                await websocket.send_json(data)
                return True
            except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away meanwhile
                state["closed"] = True
                return False

        calibration = None
        if calibrate:
            problem = Calibration.problem(calibrate, false_alarms, confidence)
            if problem:
                await send({"error": problem, "status": 422})
            else:
                calibration = Calibration(calibrate, false_alarms, confidence)
        receiver = asyncio.create_task(receive())
        dropped = 0
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                if state["closed"] or "frame" not in newest:
                    break
                frame, sent = newest.pop("frame"), newest.pop("sent")
                dropped += newest.pop("dropped", 0)
                try:
                    result = await models.score(model, frame, "camera", fmt="JPEG")
                except HTTPException as exc:
                    result = {"error": exc.detail, "status": exc.status_code}
                if calibration is not None and "score" in result:
                    calibration.scores.append(result["score"])
                    result["calibrating"] = {"frames": len(calibration.scores), "of": calibration.frames}
                if not await send({**result, "sent": sent, "dropped": dropped}):
                    break
                if calibration is not None and len(calibration.scores) == calibration.frames:
                    frames = f"{calibration.frames} camera frames (demo live mode)"
                    try:
                        done = await anyio.to_thread.run_sync(models.calibrate, model, calibration.scores,
                                                              calibration.false_alarms, calibration.confidence, frames)
                        reply = {"calibrated": done}
                    except (PipelineError, HTTPException) as exc:
                        reply = {"error": getattr(exc, "detail", str(exc)), "status": 409}
                    calibration = None
                    if not await send(reply):
                        break
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        if state["text"]:
            try:
                await websocket.close(code=1008, reason="camera frames are binary messages; text is not accepted")
            except (RuntimeError, OSError):
                pass

    return app


class CancelledAtShutdown(logging.Filter):
    """uvicorn logs a request it cancels at the end of the graceful shutdown (an upload stalled halfway)
    with the traceback of the CancelledError: one line says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "demo: a request still open %s s after the stop signal was cancelled", (GRACEFUL_SHUTDOWN_S,), None,
                None)
        return True


class Server:
    """uvicorn with a bounded stop: after SIGTERM or Ctrl-C, open requests and sockets get
    GRACEFUL_SHUTDOWN_S to finish, and the process exits by EXIT_DEADLINE_S even if a scoring thread
    (torch or onnxruntime, which cannot be interrupted) is still running."""

    def __init__(self, config):
        import uvicorn

        logging.getLogger("uvicorn.error").addFilter(CancelledAtShutdown())

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                super().handle_exit(sig, frame)
                outer.deadline(sig)

        self.server = _Server(config)
        self.timer: threading.Timer | None = None

    def deadline(self, sig: int) -> None:
        if self.timer is None:
            self.timer = threading.Timer(EXIT_DEADLINE_S, self.hard_exit, args=(sig,))
            self.timer.daemon = True  # never keeps the process alive itself
            self.timer.start()

    @staticmethod
    def hard_exit(sig: int) -> None:
        print(f"demo: still busy {EXIT_DEADLINE_S} s after the stop signal (a scoring that does not return); "
              "exiting now", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + sig)

    def run(self) -> None:
        self.server.run()


def check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    """Both or neither, and a certificate and key that TLS can load: one line, not a traceback at startup."""
    if (certfile is None) != (keyfile is None):
        raise PipelineError("--ssl-certfile and --ssl-keyfile go together (the certificate and its private key)")
    if certfile is None:
        return
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not path.is_file():
            raise PipelineError(f"{option} {path}: not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise PipelineError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a certificate and its "
                            f"unencrypted key ({type(exc).__name__}: {exc})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (torch runtime)")
    parser.add_argument("--runtime", default="onnx", choices=RUNTIMES,
                        help="onnx (default: the exported graph, faster on the CPU) or torch (the pipeline's code)")
    parser.add_argument("--ssl-certfile", type=Path, default=None,
                        help="serve HTTPS with this certificate (PEM), so a browser on another machine gives "
                        "the page its camera; see the module docstring for a self-signed one")
    parser.add_argument("--ssl-keyfile", type=Path, default=None, help="the certificate's private key (PEM)")
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")  # before anything is served: one line, exit 1
    check_runtime(args.runtime, device)
    import uvicorn

    check_tls(args.ssl_certfile, args.ssl_keyfile)
    names = fitted_models()
    if not names:
        raise PipelineError("no fitted and evaluated model under models/ (run dvc repro first)")
    scheme = "https" if args.ssl_certfile else "http"
    print(f"demo: {scheme}://{args.host}:{args.port}  ({args.runtime} runtime; models: {', '.join(names)})",
          flush=True)
    if scheme == "http" and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("demo: over plain HTTP, browsers on other machines give the page no camera (live mode needs "
              "--ssl-certfile and --ssl-keyfile); uploads work", flush=True)
    app = create_app(device, args.runtime)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="wsproto",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    Server(config).run()


if __name__ == "__main__":
    run_main(main)
