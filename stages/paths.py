"""Where each stage reads and writes; dvc.yaml declares the same paths."""
from pathlib import Path

RAW_ROOT = Path("data/raw")  # data/raw/<source>/<category>.dataset, MVTec layout
# The user's category name always sits inside one path component with this fixed suffix, so no
# value of data.category ("", ".", "..", "a/..") can make the download output (which DVC deletes
# before the stage runs) resolve to data/raw/<source>, data/raw or the workspace.
RAW_SUFFIX = ".dataset"
FEATURES_ROOT = Path("data/features")  # data/features/<backbone>/{train,val,test}.pt
PIXELS = "pixels"  # the `backbone` of models that read the prepared images themselves
PIXELS_DIR = FEATURES_ROOT / PIXELS  # data/features/pixels/{train,val,test}.npz, written by preprocess
MODELS_ROOT = Path("models")  # models/<model>/model.pt (fit), models/<model>.scoring.json (evaluate)
METRICS_ROOT = Path("metrics/models")  # metrics/models/<model>.json
SUMMARY_ROOT = Path("metrics")  # metrics/summary.{json,md,csv}
WEIGHTS_ROOT = Path("weights")  # local backbone checkpoints (backbones.<name>.weights), a dep of every extract stage
PLOTS_ROOT = Path("plots")  # plots/<model>/{roc,scores}.csv and plots/<model>/train/
TMP_ROOT = Path(".tmp")  # every stage's temporary files (git- and dvc-ignored), see common.atomic_path


def raw_category_dir(source: str, category: str) -> Path:
    """data/raw/<source>/<category>.dataset: the download output; dvc.yaml spells the same path."""
    return RAW_ROOT / str(source) / f"{category}{RAW_SUFFIX}"


def scoring_file(model: str) -> Path:
    """Written by evaluate@<model>: the scoring params and threshold predict applies."""
    return MODELS_ROOT / f"{model}.scoring.json"
