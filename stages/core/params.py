"""params.yaml, read exactly as DVC reads it and checked against one declared schema per section.

DVC parses params.yaml with ruamel.yaml's safe loader (YAML 1.2: `1e-4` is a float, `yes` is a
string); reading it any other way would let a stage see another value than the one DVC tracks.
`load_params` validates every section except the method blocks of `models.<name>.fit/score`,
which `stages.methods.entries` validates against the method's own schema when the model is built.
The result is a plain nested dict with every default filled in, so `param(params, "a.b")` works.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from stages.core import numerics
from stages.core.device import valid_device
from stages.core.errors import PipelineError
from stages.core.paths import PIXELS, REFERENCES_ROOT, reference_file
from stages.core.schema import Schema, SchemaError, check_keys, option, parse, shown, shown_key

SOURCES = ("synthetic", "mvtec", "visa", "folder")
# preprocess.mode: what the model sees of each frame (stages/data/raw.py applies it). A fit recorded
# without a mode was cropped, the only mode there was.
PREPROCESS_MODES = ("crop", "resize", "pad")
DEFAULT_MODE = "crop"
# The ImageNet mean in 0..255: the normalisation of torchvision's ResNets (the PatchCore and PaDiM papers'
# backbones) maps it to 0, the value their convolutions' own zero padding shows at every frame border, and
# EfficientNet-Lite0's (x - 127) / 128 to within 0.2 of 0; a black or white band would be an edge the
# backbone answers strongly to, at a place that depends on each frame's aspect.
DEFAULT_PAD_FILL = [124, 116, 104]
MAX_IMAGE_SIDE = 2048  # preprocess.resize and crop_size (see Preprocess)


# Upper bounds of the generator: a typo (n_train: 1000000000) must not write until the disk is full.
# MVTec AD's largest category has 391 training images of 1024 px; these allow far more.
SYNTHETIC_MAX_PIXELS = 2**30  # all generated images together: 1.07 G pixels, about 3 GB as RGB


@dataclasses.dataclass(frozen=True)
class Synthetic(Schema):
    image_size: int = option(256, "side of the generated square images", ge=32, le=2048)
    n_train: int = option(100, "defect-free training images", ge=1, le=10000)
    n_test_good: int = option(20, "defect-free test images", ge=0, le=10000)
    n_test_per_cell: int = option(2, "test images per defect type and level (each cell of the ladder)", ge=0, le=10000)
    # which names exist is the generator's business (stages/data/synthetic.py checks them)
    defect_types: list[str] = option(["color", "cut", "hole", "metal_contamination", "thread"], "defect types to draw")
    levels: list[dict] = option(
        [{"delta_e": d, "area": 256, "width": 2} for d in (16, 8, 4, 2)],
        "the difficulty ladder, easiest first: every defect type is drawn at every level "
        "(data.synthetic.levels[] below; docs/explanation/synthetic-benchmark.md)",
    )
    nuisance: dict = option({}, "variation of every image, train and test alike (data.synthetic.nuisance below)")
    seed: int = option(0, "generator seed", ge=0)

    def validate_block(self) -> None:
        images = self.n_train + self.n_test_good + self.n_test_per_cell * len(self.defect_types) * len(self.levels)
        if images * self.image_size**2 > SYNTHETIC_MAX_PIXELS:
            raise SchemaError(None, f"{images} images of {self.image_size}x{self.image_size} would be "
                                    f"{images * self.image_size**2:,} pixels, more than the generator's limit of "
                                    f"{SYNTHETIC_MAX_PIXELS:,} (fewer images or a smaller image_size)")


@dataclasses.dataclass(frozen=True)
class Level(Schema):
    delta_e: float = option(doc="mean CIE 1976 colour difference ΔE*ab between the defect's pixels and the same "
                                "pixels without it (as written, 8-bit sRGB)", gt=0, le=100)
    area: int = option(doc="pixels in the defect's mask at 256 px, the default image_size and prepared size (at "
                           "another image_size scaled by (image_size / 256)^2, as the texture)", ge=1)
    width: float = option(doc="mean width of threads and cuts, px at 256 px (scaled likewise, at least 1 px); "
                              "their length is about area / width", gt=0, le=64)


@dataclasses.dataclass(frozen=True)
class Nuisance(Schema):
    illumination: float = option(0.1, "a linear illumination gradient: brightness changes by up to this fraction "
                                      "from one side of the image to the other (random direction and amount)",
                                 ge=0, le=1)
    rotation: float = option(4.0, "the texture is rotated by up to this many degrees either way", ge=0, le=45)
    scale: float = option(0.05, "the texture is scaled by up to this fraction either way", ge=0, le=0.5)
    noise: float = option(2.0, "Gaussian sensor noise, standard deviation in 8-bit levels", ge=0, le=64)
    jpeg_quality: int = option(0, "0: none; 1 to 95: every image JPEG-compressed at this quality (stored as PNG)",
                               ge=0, le=95)


def check_ladder(levels: list[dict]) -> None:
    """Levels go from easiest to hardest: none bigger or more different than the one before, no two alike."""
    for k in range(1, len(levels)):
        before, level = levels[k - 1], levels[k]
        if any(level[key] > before[key] for key in ("delta_e", "area", "width")):
            raise PipelineError(f"data.synthetic.levels[{k}]: harder levels come later (easiest first): its delta_e, "
                                f"area and width must each be at most those of levels[{k - 1}]")
        if level == before:
            raise PipelineError(f"data.synthetic.levels[{k}]: the same as levels[{k - 1}]")


@dataclasses.dataclass(frozen=True)
class Mvtec(Schema):
    archive: str = option("full", "full: the whole dataset, fetched once for all categories from its known URLs "
                                  "(each answer checked against its SHA-256); category: the per-category archives "
                                  "(their links may be gone)", choices=("full", "category"))
    url: str | None = option(None, "null: the official URLs; or one mirror / file:// URL, the only one tried "
                                   "('{category}' in it is replaced by each category's name when archive is category); "
                                   "a file:// archive is read in place, and file:///path/to/mvtec_anomaly_detection "
                                   "(unpacked) is read from there, checked against the official image counts")
    sha256: str | None = option(
        None, "null: the published checksum of the official archive (MD5 per category, SHA-256 of the full one); "
              "or the SHA-256 of the one archive `url` names",
        check=lambda v: re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None, allowed="a SHA-256 hex digest (64 hex digits)",
    )
    # The full archive is 4.9 GB and unpacks to about as much (PNGs barely compress): 10 GB is twice
    # that, and still stops an endless mirror or a 25 kB archive that expands without end.
    max_gb: float = option(10.0, "the most the archive may take, downloaded and again unpacked (GB): the full one "
                                 "is 4.9 GB; raise it only for a larger archive of your own", gt=0, le=1000)


@dataclasses.dataclass(frozen=True)
class Visa(Schema):
    url: str | None = option(None, "null: the official VisA_20220922.tar; or one mirror / file:// URL of that archive "
                                   "(read in place), or file:///path/to/VisA (the archive unpacked, read from there)")
    sha256: str | None = option(
        None, "null: the official archive's published SHA-256 (when url is null); or the SHA-256 of the archive "
              "`url` names (the official one's also enables the per-category count check)",
        check=lambda v: re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None, allowed="a SHA-256 hex digest (64 hex digits)",
    )
    # VisA_20220922.tar is about 1.8 GB, uncompressed: 4 GB is twice that with room to spare.
    max_gb: float = option(4.0, "the most the archive may take, downloaded and again unpacked (GB): the official "
                                "one is about 1.8 GB; raise it only for a larger archive of your own", gt=0, le=1000)


@dataclasses.dataclass(frozen=True)
class Data(Schema):
    source: str = option("synthetic", "synthetic (offline default), mvtec (MVTec AD's archive), visa (VisA's archive) "
                                      "or folder (a local copy)", choices=SOURCES)
    categories: list[str] = option(["carpet"], "the categories to run, each through its own download, preprocess, "
                                               "extract, fit and evaluate stages (a DVC matrix)")
    sources: dict = option({}, "per-category source where it differs from `source`, e.g. {my_parts: folder}")
    synthetic: dict = option(
        {}, "the generator's settings (every synthetic category is the same generated carpet)"
    )  # parsed into Synthetic below
    mvtec: dict = option({}, "the MVTec AD archive's settings")
    visa: dict = option({}, "the VisA archive's settings")
    folder: str | None = option(
        None,
        "source: folder -> a folder holding one MVTec-layout folder per category "
        "(<folder>/<category>/train/good, ...), as the MVTec AD archive does",
    )
    download_dir: str | None = option(
        None,
        "where verified MVTec AD and VisA archives are kept and reused by every clone and queued experiment of "
        "the user (null: the user cache, $XDG_CACHE_HOME/anomaly-pipeline/downloads, ~/.cache/... by default); "
        "a file:// archive or unpacked folder is read where it is, only its verification is recorded here",
        check=lambda v: Path(v).expanduser().is_absolute(),
        allowed="an absolute path or ~/... (a relative one would lie inside each queued experiment's temporary copy)",
    )


@dataclasses.dataclass(frozen=True)
class Preprocess(Schema):
    # Upper bounds: the real images are at most 1024 x 1024 (MVTec AD) and about 1562 x 1500 (VisA), and the
    # papers resize to 256 (or up to 512); 2048 keeps either dataset at full resolution with room to spare,
    # while a hand-edited (or travelling: model.pt, model.onnx) 20000 would cost gigabytes per image
    # (the long side is at most 16x the short one, stages/data/raw.py: 2048 x 32768 RGB is 200 MB).
    resize: int = option(256, "shorter side after resizing", ge=16, le=MAX_IMAGE_SIDE)
    crop_size: int = option(
        224, "side of the square model input (the centre crop under mode crop)", ge=16, le=MAX_IMAGE_SIDE
    )
    val_fraction: float = option(0.1, "held-out good training images (early stopping, threshold)", gt=0, lt=1)
    seed: int = option(0, "seed of the validation split (and of the few-shot subset)")
    max_train: int | None = option(
        None,
        "few-shot: fit on at most this many good images, a seeded subset of "
        "those left after the validation split (null: all)",
        ge=1,
    )
    mode: str = option(
        DEFAULT_MODE,
        "what the model sees of each image: crop (shorter side to `resize`, then the centre `crop_size` square: "
        "the MVTec AD and VisA papers' setting; the rest of a non-square image is never seen), resize (the whole "
        "image to crop_size x crop_size, aspect not kept) or pad (the whole image, aspect kept, centred on a "
        "crop_size square of `pad_fill`; padded pixels count in no pixel metric). resize and pad ignore `resize`",
        choices=PREPROCESS_MODES,
    )
    pad_fill: list[int] = option(
        DEFAULT_PAD_FILL,
        "mode pad: the padding's RGB colour (the ImageNet mean, which the backbones normalise to about 0)",
        ge=0,
        le=255,
        check=lambda v: len(v) == 3,
        allowed="three integers in [0, 255] (R, G, B)",
    )

    def validate_block(self) -> None:
        if self.crop_size > self.resize:
            raise SchemaError("crop_size", f"must be at most preprocess.resize ({self.resize}), got {self.crop_size}")


@dataclasses.dataclass(frozen=True)
class Backbone(Schema):
    arch: str | None = option(None, "architecture when the entry name is not one (null: the entry name)")
    weights: str | None = option(None, "a checkpoint file under weights/ (null: the packaged / torchvision weights)")
    layers: list[str] | None = option(None, "mid-level modules to cache (null: the architecture's defaults)")
    batch_size: int = option(16, "images per forward pass", ge=1)


@dataclasses.dataclass(frozen=True)
class Evaluate(Schema):
    fpr_limit: float = option(0.3, "AUPRO integrated up to this false-positive rate", gt=0, le=1)
    threshold_n_std: float = option(2.0, "threshold_rule mean_std: threshold = mean + n_std * std of the validation "
                                         "scores", ge=0)
    threshold_rule: str = option(
        "mean_std",
        "mean_std: mean + threshold_n_std * std of the validation (good) scores (the study's rule); quantile: just "
        "above the order statistic of the validation scores that keeps false alarms at most threshold_false_alarms "
        "with threshold_confidence, whatever their distribution (needs enough validation images: 299 for 1% at 95%)",
        choices=("mean_std", "quantile"),
    )
    threshold_false_alarms: float = option(0.01, "threshold_rule quantile: the false-alarm rate on good images the "
                                                 "threshold keeps to", gt=0, lt=1)
    threshold_confidence: float = option(0.95, "threshold_rule quantile: the confidence of that bound", gt=0, lt=1)
    bins: int = option(
        8192,
        "pixel scores are counted on this many quantile bins (pixel AUROC, PRO curve and their "
        "intervals; within 1e-4 of the exact values)",
        ge=16,
        le=2**20,
    )
    bootstrap: dict = option({}, "confidence intervals over resampled test sets")


@dataclasses.dataclass(frozen=True)
class Bootstrap(Schema):
    resamples: int = option(
        1000, "stratified bootstrap resamples of the test images (good and defective apart)", ge=10, le=100000
    )
    confidence: float = option(0.95, "level of the percentile intervals", gt=0, lt=1)
    seed: int = option(0, "seed of the resamples (the same for every model of a category: paired comparisons)", ge=0)


@dataclasses.dataclass(frozen=True)
class Overview(Schema):
    per_defect: int = option(2, "seeded test images per defect type (and good), raw and as the model sees them", ge=1)
    seed: int = option(0, "seed of the selection")


@dataclasses.dataclass(frozen=True)
class Heatmaps(Schema):
    per_defect: int = option(2, "seeded test images per defect type in each heatmap grid", ge=1)
    good: int = option(2, "good test images in each heatmap grid", ge=0)
    seed: int = option(0, "seed of the selection")


@dataclasses.dataclass(frozen=True)
class Distribution(Schema):
    bins: int = option(20, "histogram bins of the score distributions", ge=2)


@dataclasses.dataclass(frozen=True)
class Tsne(Schema):
    perplexity: float = option(30.0, "t-SNE perplexity (capped at (images - 1) / 3)", gt=0)
    iterations: int = option(1000, "t-SNE optimisation steps", ge=250)
    seed: int = option(0, "t-SNE seed")


@dataclasses.dataclass(frozen=True)
class Figures(Schema):
    curve_points: int = option(2000, "pixel ROC and PRO curves are thinned to about this many points", ge=10)
    overview: dict = option({}, "plots/<category>.category/overview.png")
    heatmaps: dict = option({}, "plots/<category>.category/<model>.model/figures/heatmaps.png")
    distribution: dict = option({}, "plots/<category>.category/<model>.model/figures/scores.png")
    tsne: dict = option({}, "plots/<category>.category/<backbone>.tsne.csv")


def param(params: dict, dotted: str, default: Any = ...) -> Any:
    """Look up 'a.b.c' in params; a missing key without default names the param in the error."""
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            if default is ...:
                raise PipelineError(f"params.yaml: missing parameter '{dotted}'")
            return default
        node = node[key]
    return node


@dataclasses.dataclass(frozen=True)
class Top(Schema):
    device: str = option(
        "auto",
        "where extract, fit, evaluate and figures run: auto (a CUDA GPU when present), cpu, cuda or cuda:N",
        check=valid_device,
        allowed="auto, cpu, cuda or cuda:N",
    )
    fit_seeds: list[int] = option(
        [0, 1, 2],
        "seeds of every fit that draws random numbers (each such model is "
        "fitted once per seed; the others once); results: mean and std over them",
        ge=0,
        check=lambda v: len(set(v)) == len(v),
        allowed="a non-empty list of distinct integers >= 0",
    )
    numerics: str = option(
        numerics.DEFAULT,
        "strict: the same bytes on every x86-64 CPU with AVX2, Intel or AMD (fixed kernels "
        "and threads, docs/explanation/reproducibility.md); fast: native "
        "kernels, every core",
        choices=numerics.MODES,
    )
    data: dict = option({}, "stage download")
    preprocess: dict = option({}, "stage preprocess")
    backbones: dict = option({}, "one extract@<category>-<name> stage per category each")
    models: dict = option({}, "one fit@<category>-<name> and evaluate@<category>-<name> stage per category each")
    evaluate: dict = option({}, "stage evaluate")
    figures: dict = option(
        {}, "stages overview@<category>, figures@<category>-<model>, tsne@<category>-<backbone>; curve_points: evaluate"
    )


MODEL_KEYS = ["method", "backbone", "fit", "score", "reference"]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # category, model and backbone names become folder names


def check_name(section: str, name: object) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PipelineError(
            f"{section}.{shown_key(name)}: a {section[:-1]} name must be letters, digits, '_' or '-' "
            f"(it names folders such as models/<category>.category/<name>.model), got {shown(name)}"
        )


def check_categories(categories: list) -> None:
    if not categories:
        raise PipelineError("data.categories: empty (list at least one category, e.g. [carpet])")
    for category in categories:
        if not isinstance(category, str) or not NAME.fullmatch(category):
            raise PipelineError(
                f"data.categories: invalid category name {shown(category)} (a plain folder name such as "
                "'carpet': letters, digits, '_' or '-')"
            )
    if "mean" in categories:
        raise PipelineError("data.categories: 'mean' is reserved (the report's row of means over categories)")
    repeated = sorted({c for c in categories if categories.count(c) > 1})
    if repeated:
        raise PipelineError(f"data.categories: {', '.join(repeated)} listed twice")


def category_source(params: dict, category: str) -> str:
    """Where `category` comes from: data.sources.<category>, else data.source."""
    return (params["data"]["sources"] or {}).get(category, params["data"]["source"])


def check_listed(params: dict, category: str) -> None:
    """A stage's category argument must be one of data.categories (dvc.yaml only passes those)."""
    listed = params["data"]["categories"]
    if category not in listed:
        raise PipelineError(f"data.categories: {category!r} is not listed (listed: {', '.join(listed)})")


def read_yaml(path: Path) -> object:
    from ruamel.yaml import YAML, YAMLError

    try:
        # typ="safe" as DVC's parse_yaml: the same parser (ruamel.yaml.clib's C one when installed, which, for
        # one, ignores a `%YAML 1.1` directive), so a stage reads every value as DVC hashes it
        return YAML(typ="safe").load(path.read_text())
    except YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def _check_model_entry(name: str, entry: object, backbones: dict) -> dict:
    """The entry's shape; its method and blocks are checked by stages.methods.entries against the method."""
    where = f"models.{name}"
    if not isinstance(entry, dict):
        raise PipelineError(f"{where}: expected a mapping with method, backbone, fit and score")
    check_keys(entry, MODEL_KEYS, where)
    method, backbone = entry.get("method"), entry.get("backbone")
    if not isinstance(method, str):
        raise PipelineError(f"{where}.method: missing (a method name, e.g. patchcore)")
    if not isinstance(backbone, str):
        raise PipelineError(f"{where}.backbone: missing (a name from `backbones:`, or '{PIXELS}')")
    if backbone != PIXELS and backbone not in backbones:
        known = ", ".join([PIXELS, *backbones])
        raise PipelineError(
            f"{where}.backbone: {shown(backbone)} is not configured under `backbones:` (known: {known})"
        )
    for block in ("fit", "score"):
        if not isinstance(entry.get(block, {}), dict):
            raise PipelineError(f"{where}.{block}: expected a mapping of parameters, got {shown(entry[block])}")
    reference = entry.get("reference")
    if reference is not None:
        check_reference(f"{where}.reference", reference)
    return {"method": method, "backbone": backbone, "fit": entry.get("fit") or {}, "score": entry.get("score") or {},
            "reference": reference}


def check_reference(key: str, name: object) -> None:
    """`models.<name>.reference`: the name of a committed table of published results, references/<name>.csv
    (checked when params.yaml is read, so a typo fails before any stage runs, not in the report at the end)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PipelineError(f"{key}: expected the name of a table in {REFERENCES_ROOT}/ (letters, digits, '_' or '-'), "
                            f"got {shown(name)}")
    if not reference_file(name).is_file():
        known = ", ".join(sorted(p.stem for p in REFERENCES_ROOT.glob("*.csv"))) or "none"
        raise PipelineError(f"{key}: no table {reference_file(name)} (known: {known})")


def validate(raw: object, path: Path) -> dict:
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping at the top level")
    top = parse(Top, raw, "")
    data = parse(Data, top.data, "data")
    check_categories(data.categories)
    for category, source in (data.sources or {}).items():
        if category not in data.categories:
            raise PipelineError(
                f"data.sources.{shown_key(category)}: not a category of data.categories ({', '.join(data.categories)})"
            )
        if source not in SOURCES:
            raise PipelineError(
                f"data.sources.{shown_key(category)}: unknown source {shown(source)} (known: {', '.join(SOURCES)})"
            )
    backbones = top.backbones or {}
    if not isinstance(backbones, dict):
        raise PipelineError("backbones: expected a mapping of backbone entries")
    models = top.models or {}
    if not isinstance(models, dict):
        raise PipelineError("models: expected a mapping of model entries")
    for section, entries in (("backbones", backbones), ("models", models)):
        for name in entries:
            check_name(section, name)
    if PIXELS in backbones:
        raise PipelineError(f"backbones.{PIXELS}: reserved (models with backbone: {PIXELS} read the prepared images)")
    return {
        "device": top.device,
        "numerics": top.numerics,
        "fit_seeds": top.fit_seeds,
        "data": {
            **data.as_dict(),
            "synthetic": _synthetic(data.synthetic),
            "mvtec": parse(Mvtec, data.mvtec, "data.mvtec").as_dict(),
            "visa": parse(Visa, data.visa, "data.visa").as_dict(),
        },
        "preprocess": parse(Preprocess, top.preprocess, "preprocess").as_dict(),
        "backbones": {name: parse(Backbone, entry, f"backbones.{name}").as_dict() for name, entry in backbones.items()},
        "models": {name: _check_model_entry(name, entry, backbones) for name, entry in models.items()},
        "evaluate": _evaluate(top.evaluate),
        "figures": _figures(top.figures),
    }


def _synthetic(raw: dict) -> dict:
    synthetic = parse(Synthetic, raw, "data.synthetic").as_dict()
    levels = [
        parse(Level, level, f"data.synthetic.levels[{k}]").as_dict() for k, level in enumerate(synthetic["levels"])
    ]
    check_ladder(levels)
    nuisance = parse(Nuisance, synthetic["nuisance"], "data.synthetic.nuisance").as_dict()
    return {**synthetic, "levels": levels, "nuisance": nuisance}


def _evaluate(raw: dict) -> dict:
    evaluate = parse(Evaluate, raw, "evaluate")
    return {**evaluate.as_dict(), "bootstrap": parse(Bootstrap, evaluate.bootstrap, "evaluate.bootstrap").as_dict()}


def _figures(raw: dict) -> dict:
    figures = parse(Figures, raw, "figures")
    blocks = {"overview": Overview, "heatmaps": Heatmaps, "distribution": Distribution, "tsne": Tsne}
    return {
        **figures.as_dict(),
        **{key: parse(schema, getattr(figures, key), f"figures.{key}").as_dict() for key, schema in blocks.items()},
    }


def load_params(path: str | Path = "params.yaml") -> dict:
    """params.yaml -> validated dict with defaults filled in; a one-line error names any bad key."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found (run from the project root)")
    return validate(read_yaml(path), path)
