"""A local demo page: pick a fitted model, drop an image, see its score, verdict and heatmap.

    python -m stages.demo              # then open http://127.0.0.1:8000
    python -m stages.demo --port 8080  # --host 0.0.0.0 to serve other machines (think twice)

It scores exactly as `python -m stages.predict` does (the same FittedModel: the model's own input
recipe, its evaluate threshold). Binds to localhost by default; refuses files that are not images
PIL can read and uploads over MAX_UPLOAD_MB. The page is one self-contained HTML file: no CDN,
it works offline.
"""
from __future__ import annotations

import argparse
import base64
import io
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image

from stages.errors import PipelineError
from stages.data.raw import ImageTooLarge
from stages.overlay import overlay
from stages.predict import FittedModel, fitted_models as fitted_pairs

MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
PAGE = Path(__file__).with_name("demo.html")


def fitted_models() -> list[str]:
    """'<category>/<model>' of every model `dvc repro` has fitted and evaluated (both are needed to
    score and decide)."""
    return [f"{category}/{name}" for category, name in fitted_pairs()]


def png_data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(device: str = "cpu") -> FastAPI:
    app = FastAPI(title="Anomaly detection demo")
    loaded: dict[str, FittedModel] = {}  # each model (and its backbone) is loaded once

    def model(name: str) -> FittedModel:
        if name not in fitted_models():
            raise HTTPException(404, f"model '{name}' is not fitted and evaluated (run dvc repro)")
        if name not in loaded:
            category, model_name = name.split("/", 1)
            try:
                loaded[name] = FittedModel.load(category, model_name, device=device)
            except PipelineError as exc:  # a corrupt or refused model or scoring file: the server's data, said plainly
                raise HTTPException(503, str(exc)) from None
        return loaded[name]

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text().replace("{max_upload_mb}", str(MAX_UPLOAD_MB))

    @app.get("/api/models")
    def models() -> list[str]:
        return fitted_models()

    @app.post("/api/predict")
    async def predict(model_name: str = Form(..., alias="model"), file: UploadFile = File(...)) -> dict:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{file.filename}: larger than {MAX_UPLOAD_MB} MB")
        fitted = model(model_name)
        start = time.perf_counter()
        try:
            image = fitted.prepare(io.BytesIO(data))
        except ImageTooLarge as exc:
            raise HTTPException(413, f"{file.filename}: {str(exc).split(': ', 1)[1]}") from None
        except PipelineError:
            raise HTTPException(415, f"{file.filename}: not an image that can be read") from None
        prediction = fitted.score(image[None], [file.filename or "upload"])
        score = float(prediction.image_scores[0])
        heatmap = None
        if prediction.anomaly_maps is not None:
            heatmap = png_data_url(overlay(image, prediction.anomaly_maps[0], fitted.colour_scale))
        return {
            "model": model_name,
            "image": file.filename,
            "score": score,
            "threshold": fitted.threshold,
            "anomalous": score >= fitted.threshold,
            "overlay": heatmap,
            "input": png_data_url(image),
            "ms": round(1000 * (time.perf_counter() - start), 1),
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import uvicorn

    if not fitted_models():
        raise SystemExit("error: no fitted and evaluated model under models/ (run dvc repro first)")
    print(f"demo: http://{args.host}:{args.port}  (models: {', '.join(fitted_models())})")
    uvicorn.run(create_app(args.device), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
