"""A local demo page: pick a fitted model, drop an image or start the camera, see score, verdict and heatmap.

    python -m stages.demo                   # then open http://127.0.0.1:8000
    python -m stages.demo --runtime torch   # the pipeline's own code instead of the exported ONNX graph
    python -m stages.demo --port 8080       # --host 0.0.0.0 to serve other machines (think twice)

It scores exactly as `python -m stages.predict` does (the same models of stages/deploy/torch_model.py: the
model's own input recipe, its evaluate threshold). Two ways in:
- POST /api/predict?model=<category>/<model>: one image as the request body. Larger than
  MAX_UPLOAD_MB: 413, refused on its Content-Length or as soon as the body passes the limit while
  it streams in (nothing is spooled to disk); over the pixel bounds: 413; not an image: 415.
- WebSocket /api/live?model=...: camera frames from the page (8-byte send time + JPEG). The server
  keeps only the newest frame and scores it as soon as the previous one is done, so when scoring is
  slower than the camera, older frames are dropped and the latency stays bounded.
Scoring runs in worker threads, one image at a time per model, so the page and /api/models answer
while images are scored. The list of fitted models is read from models/ at start and again whenever
the page asks for it (GET /api/models, on every page load), never per image or camera frame: a model
that `dvc repro` fits while the server runs appears when the page is reloaded. A model or scoring
file that is missing, corrupt or refused answers 503 with its one-line error, as JSON. Binds to
localhost by default; no page loads anything from a CDN (FastAPI's /docs and /redoc are off).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import struct
import threading
import time
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from PIL import Image

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError
from stages.data.raw import ImageTooLarge
from stages.deploy.overlay import overlay
from stages.deploy.runtimes import RUNTIMES, check_runtime, load_model
from stages.deploy.runtimes import fitted_models as fitted_pairs
from stages.evaluation.threshold import flagged

MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
PAGE = Path(__file__).parent / "deploy" / "demo.html"


def fitted_models() -> list[str]:
    """'<category>/<model>' of every model `dvc repro` has fitted and evaluated."""
    return [f"{category}/{name}" for category, name in fitted_pairs()]


def data_url(array: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


class Models:
    """Each model (and its backbone) loaded once, on first use; one image at a time per model (torch
    and onnxruntime already use every core of the machine's share), in worker threads."""

    def __init__(self, runtime: str, device: str):
        self.runtime, self.device = runtime, device
        self.names = fitted_models()  # cached: refreshed by refresh() (GET /api/models), not per image
        self.loaded: dict[str, object] = {}
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
                    self.loaded[name] = load_model(category, model_name, self.runtime, self.device)
                except PipelineError as exc:  # a corrupt, refused or missing file: the server's data, said plainly
                    raise HTTPException(503, str(exc)) from None
            return self.loaded[name]

    def limiter(self, name: str) -> anyio.CapacityLimiter:
        return self.limiters.setdefault(name, anyio.CapacityLimiter(1))

    async def score(self, name: str, data: bytes, label: str, fmt: str = "PNG") -> dict:
        model = await anyio.to_thread.run_sync(self.get, name)
        return await anyio.to_thread.run_sync(score_bytes, model, name, data, label, fmt, limiter=self.limiter(name))


def score_bytes(model, name: str, data: bytes, label: str, fmt: str) -> dict:
    """One image's bytes -> the page's answer (raises HTTPException 413 / 415 for images it refuses)."""
    start = time.perf_counter()
    try:
        image = model.prepare(io.BytesIO(data))
    except ImageTooLarge as exc:
        raise HTTPException(413, f"{label}: {str(exc).split(': ', 1)[1]}") from None
    except PipelineError:
        raise HTTPException(415, f"{label}: not an image that can be read") from None
    prediction = model.score(image[None], [label])
    score = float(prediction.image_scores[0])
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


def create_app(device: str = "cpu", runtime: str = "onnx") -> FastAPI:
    app = FastAPI(title="Anomaly detection demo", docs_url=None, redoc_url=None, openapi_url=None)
    models = Models(runtime, device)

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
    async def live(websocket: WebSocket, model: str) -> None:
        await websocket.accept()
        newest: dict = {}
        arrived = asyncio.Event()
        closed = False

        async def receive() -> None:
            nonlocal closed
            try:
                while True:
                    message = await websocket.receive_bytes()
                    if len(message) > MAX_UPLOAD_BYTES or len(message) < 9:
                        continue  # not a frame this page sends
                    if newest:
                        newest["dropped"] = newest.get("dropped", 0) + 1  # the older frame is never scored
                    newest.update(sent=struct.unpack("<d", message[:8])[0], frame=message[8:])
                    arrived.set()
            except WebSocketDisconnect:
                closed = True
                arrived.set()

        receiver = asyncio.create_task(receive())
        dropped = 0
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                if closed:
                    break
                frame, sent = newest.pop("frame"), newest.pop("sent")
                dropped += newest.pop("dropped", 0)
                try:
                    result = await models.score(model, frame, "camera", fmt="JPEG")
                except HTTPException as exc:
                    result = {"error": exc.detail, "status": exc.status_code}
                await websocket.send_json({**result, "sent": sent, "dropped": dropped})
        except WebSocketDisconnect:
            pass
        finally:
            receiver.cancel()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (torch runtime)")
    parser.add_argument("--runtime", default="onnx", choices=RUNTIMES,
                        help="onnx (default: the exported graph, faster on the CPU) or torch (the pipeline's code)")
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")  # before anything is served: one line, exit 1
    check_runtime(args.runtime, device)
    import uvicorn

    names = fitted_models()
    if not names:
        raise PipelineError("no fitted and evaluated model under models/ (run dvc repro first)")
    print(f"demo: http://{args.host}:{args.port}  ({args.runtime} runtime; models: {', '.join(names)})")
    app = create_app(device, args.runtime)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws="wsproto")


if __name__ == "__main__":
    run_main(main)
