"""Where each stage reads and writes; dvc.yaml declares the same paths.

Every user-given name (category, backbone, model) ends in a path component with a fixed suffix
(`carpet.category`, `patchcore_effnet.model`, `efficientnet_lite0.features`), and every output lies
under such a component or is a file whose name carries one (`<model>.metrics.json`,
`<backbone>.tsne.csv`). DVC deletes a stage's outputs before the stage can check its names, so this
layout is what keeps a value like "", ".", ".." or "a/../.." from resolving an output to data/,
models/, a category's folder, a user's file or the workspace: whatever a name resolves to, only a
path carrying the suffix can be touched.
"""
from pathlib import Path

RAW_ROOT = Path("data/raw")  # data/raw/<category>.dataset, MVTec layout (train/good, test/<type>, ground_truth)
FEATURES_ROOT = Path("data/features")  # data/features/<category>.category/<backbone>.features/{train,val,test}.pt
PIXELS = "pixels"  # the `backbone` of models that read the prepared images themselves (written by preprocess)
MODELS_ROOT = Path(
    "models"
)  # models/<category>.category/<model>.model/seed-<s>/model.pt, <model>.scoring.json, <model>.export/
METRICS_ROOT = Path("metrics/models")  # metrics/models/<category>.category/<model>.metrics.json
EVALUATIONS_ROOT = Path("data/evaluations")  # data/evaluations/<category>.category/<model>.resamples.npz
SUMMARY_ROOT = Path("metrics")  # metrics/summary.{json,md,csv}: every category x model
WEIGHTS_ROOT = Path("weights")  # local backbone checkpoints (backbones.<name>.weights), a dep of every extract stage
PLOTS_ROOT = Path("plots")  # plots/<category>.category/<model>.model/{roc,scores,...}.csv, train/, figures/
TMP_ROOT = Path(".tmp")  # every stage's temporary files (git- and dvc-ignored), see stages/core/outputs.py atomic_path

REFERENCES_ROOT = Path("references")  # references/<name>.csv: published results, models.<name>.reference

RAW_SUFFIX = ".dataset"
CATEGORY_SUFFIX = ".category"
FEATURES_SUFFIX = ".features"
MODEL_SUFFIX = ".model"


def _category(category: str) -> str:
    return f"{category}{CATEGORY_SUFFIX}"


def raw_category_dir(category: str) -> Path:
    """data/raw/<category>.dataset: the download output."""
    return RAW_ROOT / f"{category}{RAW_SUFFIX}"


def features_dir(category: str, backbone: str) -> Path:
    """data/features/<category>.category/<backbone>.features: extract@<category>-<backbone>;
    <backbone> = pixels is the prepared images, written by preprocess@<category>."""
    return FEATURES_ROOT / _category(category) / f"{backbone}{FEATURES_SUFFIX}"


def pixels_dir(category: str) -> Path:
    return features_dir(category, PIXELS)


def model_dir(category: str, model: str) -> Path:
    """models/<category>.category/<model>.model: the fitted state (fit@<category>-<model>)."""
    return MODELS_ROOT / _category(category) / f"{model}{MODEL_SUFFIX}"


def seed_dir(category: str, model: str, seed: int) -> Path:
    """models/<category>.category/<model>.model/seed-<seed>: one fit of the model (params.yaml fit_seeds)."""
    return model_dir(category, model) / f"seed-{int(seed)}"


def resamples_file(category: str, model: str) -> Path:
    """Written by evaluate@<category>-<model>: the metrics of every bootstrap resample (read by compare)."""
    return EVALUATIONS_ROOT / _category(category) / f"{model}.resamples.npz"


def scoring_file(category: str, model: str) -> Path:
    """Written by evaluate@<category>-<model>: the scoring params and threshold predict applies."""
    return MODELS_ROOT / _category(category) / f"{model}.scoring.json"


EXPORT_SUFFIX = ".export"
ONNX_FILE = "model.onnx"


def export_dir(category: str, model: str) -> Path:
    """models/<category>.category/<model>.export: export@<category>-<model>, the first seed's fit as one
    graph, model.onnx (with its weights in files beside it when they pass ONNX's 2 GiB limit)."""
    return MODELS_ROOT / _category(category) / f"{model}{EXPORT_SUFFIX}"


def onnx_file(category: str, model: str) -> Path:
    return export_dir(category, model) / ONNX_FILE


def metrics_file(category: str, model: str) -> Path:
    return METRICS_ROOT / _category(category) / f"{model}.metrics.json"


def plots_dir(category: str, model: str) -> Path:
    """plots/<category>.category/<model>.model: curves (evaluate), train/ (fit), figures/ (figures)."""
    return PLOTS_ROOT / _category(category) / f"{model}{MODEL_SUFFIX}"


def category_plots_dir(category: str) -> Path:
    """plots/<category>.category: overview.png (overview@<category>)."""
    return PLOTS_ROOT / _category(category)


def tsne_file(category: str, backbone: str) -> Path:
    """plots/<category>.category/<backbone>.tsne.csv: tsne@<category>-<backbone>."""
    return PLOTS_ROOT / _category(category) / f"{backbone}.tsne.csv"


def reference_file(name: str) -> Path:
    """references/<name>.csv: a table of published per-category results (models.<model>.reference)."""
    return REFERENCES_ROOT / f"{name}.csv"
