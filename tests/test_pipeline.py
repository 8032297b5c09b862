"""End to end with real `dvc` commands on a tiny configuration, in a temporary copy of the repo.

Proves: every configured model gets metrics; rerunning the seeded stages gives the same bytes (figure
PNGs included); a fitting param reruns only that model's fit/evaluate/figures and the report, a scoring
param only its evaluate/figures and the report; a second category (another source, grayscale) adds
only its own stages and joins the category x model tables, a third makes only its own stages and
the report stale; push -> clone -> pull recomputes nothing; a preprocess param makes every reader
of the prepared images stale and never the download; `dvc plots show` renders every declared plot
on one offline page.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import docs
from tests.conftest import REPO
from tests.tiny import (
    ALL_MODEL_PLOTS,
    DVC,
    chart_model,
    dvc,
    dvc_json,
    ran,
    read_metrics,
    set_param,
    top_level_plots,
    with_plot_sources_of,
)


def test_all_model_charts_list_every_model_of_params_yaml():
    """Adding a model means adding its line to each all-model chart in dvc.yaml (DVC cannot loop there)."""
    models = set(yaml.safe_load((REPO / "params.yaml").read_text())["models"])
    plots = top_level_plots(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    for plot_id in ALL_MODEL_PLOTS:
        assert {chart_model(path) for path in plots[plot_id]["y"]} == models, f"dvc.yaml plots.{plot_id}"
        assert all(Path(path).parts[1] == "${data.categories[0]}.category" for path in plots[plot_id]["y"])


@pytest.fixture
def first_run(workspace) -> dict:
    return read_metrics(workspace)


def test_repro_writes_metrics_for_every_model(workspace, first_run):
    repo = workspace
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    summary = first_run["metrics/summary.json"]["mean"]
    assert set(summary) == set(models)
    for name in models:
        metrics = first_run[f"metrics/models/carpet.category/{name}.metrics.json"]
        assert summary[name]["image_auroc"] == metrics["image_auroc"]  # the mean of one category
        assert summary[name]["image_auroc"] is not None
    # the easiest level's defects (ΔE*ab 24) are clearly visible: PatchCore separates them (not a random 0.5)
    # and better than the hardest (ΔE*ab 2, the just-noticeable difference), which it may miss
    easiest = first_run["metrics/models/carpet.category/patchcore_effnet.metrics.json"]["levels"]
    assert easiest["image_auroc"]["L1"] >= 0.9 and easiest["pixel_auroc"]["L1"] >= 0.9
    assert easiest["image_auroc"]["L1"] > easiest["image_auroc"]["L2"]
    for name in models:  # every model is scored per level, with intervals and detection limits
        levels = first_run[f"metrics/models/carpet.category/{name}.metrics.json"]["levels"]
        assert list(levels["image_auroc"]) == ["L1", "L2"] and set(levels["detection_limit"]) == {"auroc_0.9",
                                                                                                 "auroc_0.75"}
        low, high = levels["interval"]["image_auroc"]["L1"]
        assert low <= levels["image_auroc"]["L1"] <= high
    assert "## Image AUROC per difficulty level: carpet" in (repo / "metrics/summary.md").read_text()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, model in models.items():
        has_maps = model["method"] != "global_knn"  # every method but the global kNN gives anomaly maps
        assert (summary[name]["pixel_auroc"] is not None) == has_maps, name
        assert (summary[name]["aupro"] is not None) == has_maps, name
    trained = [name for name, model in models.items() if "epochs" in model["fit"]]
    assert trained, "the configuration should include trained models"
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    for name in trained:  # one learning curve per model: the training and the validation loss of every epoch
        curve = f"plots/carpet.category/{name}.model/train/plots/custom/losses.json"
        assert curve in plots, f"no learning curve for {name} in dvc plots show"
        rows = json.loads((repo / curve).read_text())
        epochs = range(1, params["models"][name]["fit"]["epochs"] + 1)
        assert [(r["epoch"], r["split"]) for r in rows] == [(e, s) for e in epochs for s in ("train", "validation")]
        last = json.loads((repo / f"plots/carpet.category/{name}.model/train/metrics.json").read_text())
        assert [last["train_loss"], last["val_loss"]] == [r["loss"] for r in rows[-2:]]  # the metric is the last epoch
    assert "image_roc" in plots  # every model's ROC on one chart (test_plots_show_offline_page)
    assert "Data and pipelines are up to date" in dvc(repo, "status")
    # each number once: the per-model files are the metrics, the summary is a plain output
    shown = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    assert {f for f in files if f.startswith("metrics/")} == {
        f"metrics/models/carpet.category/{name}.metrics.json" for name in models
    }


def png_panels(path: Path) -> tuple[int, int]:
    """(rows, columns) of an image grid, as stages/plotting/style.save_png records it in the PNG."""
    from PIL import Image

    with Image.open(path) as image:
        rows, cols = image.text["Comment"].removeprefix("panels=").split("x")
    return int(rows), int(cols)


def test_plots_show_offline_page(workspace, first_run, tmp_path):
    repo = workspace
    """Every declared plot is shown and non-empty, all models share the curve charts, the page needs
    no network, and the image grids have one row per selected image and one column per view."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    models, backbones, fig = params["models"], params["backbones"], params["figures"]
    with_maps = [m for m, entry in models.items() if entry["method"] != "global_knn"]
    pixel_aes = [m for m, entry in models.items() if entry["method"] in ("autoencoder", "skip_autoencoder")]
    shown = json.loads(dvc(repo, "plots", "show", "--json"))["data"]

    top_level = {}
    for entry in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]:
        top_level.update(entry)
    for plot_id in ("image_roc", "image_pr", "pixel_roc", "pro"):  # all models, so colours match across charts
        sources = {chart_model(path) for path in top_level[plot_id]["y"]}
        assert sources == set(models), f"dvc.yaml plots.{plot_id} must list exactly these models: {sorted(models)}"
        values = shown[plot_id][0]["content"]["data"]["values"]
        assert {v["filename"].split("/")[0].removesuffix(".model") for v in values} == set(models), plot_id
    here = "plots/carpet.category"
    for m in with_maps:  # real pixel curves, not the one-point placeholder of models without maps
        assert len((repo / f"{here}/{m}.model/pixel_roc.csv").read_text().splitlines()) > 20, m
    trained = [m for m, entry in models.items() if "epochs" in entry["fit"]]
    expected_vega = {"image_roc", "image_pr", "pixel_roc", "pro", "summary", "categories", "intervals", "pairwise",
                     "detection_by_level"}
    expected_vega |= {f"{here}/{m}.model/{name}.csv" for m in models for name in ("confusion", "scores")}
    expected_vega |= {f"{here}/{b}.tsne.csv" for b in backbones}
    expected_vega |= {f"{here}/{m}.model/train/plots/custom/losses.json" for m in trained}
    expected_images = {f"{here}/overview.png", "plots/summary.png"}
    expected_images |= {f"{here}/{m}.model/figures/scores.png" for m in models}
    expected_images |= {f"{here}/{m}.model/figures/heatmaps.png" for m in with_maps}
    assert expected_vega | expected_images <= set(shown)
    assert not {f"{here}/{m}.model/figures/heatmaps.png" for m in set(models) - set(with_maps)} & set(
        shown
    )  # no maps, no grid
    for plot_id in expected_vega:
        assert shown[plot_id][0]["type"] == "vega", plot_id
        assert shown[plot_id][0]["content"]["data"]["values"], f"{plot_id}: no data"
    for plot_id in expected_vega:  # a title that says what the chart shows, never a file path
        title = chart_title(shown[plot_id][0]["content"])
        assert title and not re.search(r"\.(csv|tsv|json)\b|plots/", title), f"{plot_id}: title {title!r}"
        if ".model/" in plot_id:  # a chart of one model names it and its category
            assert chart_model(plot_id) in title and "carpet" in title, f"{plot_id}: title {title!r}"
    for m in models:  # every test image's score by its label, with the threshold evaluate set and its decisions
        rows = shown[f"{here}/{m}.model/scores.csv"][0]["content"]["data"]["values"]
        threshold = json.loads((repo / f"models/carpet.category/{m}.scoring.json").read_text())["threshold"]
        assert {r["defect_type"] for r in rows} == set(params["data"]["synthetic"]["defect_types"]) | {"good"}
        assert all(float(r["threshold"]) == threshold for r in rows), m
        assert [int(r["anomalous"]) for r in rows] == [int(float(r["score"]) >= threshold) for r in rows], m
        confusion = shown[f"{here}/{m}.model/confusion.csv"][0]["content"]["data"]["values"]
        decisions = {r["image"]: r["predicted"] == "anomalous" for r in confusion}
        assert {r["image"]: r["anomalous"] == "1" for r in rows} == decisions, m  # the chart next to it agrees
    tsne = shown[f"{here}/{next(iter(backbones))}.tsne.csv"][0]["content"]["data"]["values"]
    assert {v["split"] for v in tsne} == {"train", "val", "test"}
    for plot_id in expected_images:
        assert shown[plot_id][0]["type"] == "image", plot_id
        assert (repo / plot_id).stat().st_size > 5000, f"{plot_id}: suspiciously small"

    # image grids: rows = selected images, columns = views (the reconstruction only for pixel AEs)
    test_types = set(params["data"]["synthetic"]["defect_types"])
    per_type = params["data"]["synthetic"]["n_test_per_cell"] * len(params["data"]["synthetic"]["levels"])
    n_good = params["data"]["synthetic"]["n_test_good"]
    heat = fig["heatmaps"]
    rows = len(test_types) * min(heat["per_defect"], per_type) + min(heat["good"], n_good)
    for m in with_maps:
        assert png_panels(repo / f"{here}/{m}.model/figures/heatmaps.png") == (rows, 6 if m in pixel_aes else 5), m
    per = fig["overview"]["per_defect"]
    # a row of training images, one per defect type, one of good test images; `per` images each (per = 1 here)
    assert per == 1 and png_panels(repo / f"{here}/overview.png") == (1 + len(test_types) + 1, 2 * per)

    # the HTML page: DVC fills the project template; nothing is loaded from the network
    out = tmp_path / "page"
    dvc(repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "window.vegaEmbed=" in html.replace(" ", "")  # the inlined vega-embed bundle
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html), (
        "the page loads something from the network"
    )
    assert "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed('#") == len(expected_vega | {k for k, v in shown.items() if v[0]["type"] == "vega"})
    images = re.findall(r'<img src="(static/[^"]+)"', html)
    assert len(images) == len(expected_images)
    assert all((out / src).stat().st_size > 5000 for src in images)

    # the page as a browser lays it out: the questions in order, every plot under its heading, every chart drawn
    per_model = "{here}/{m}.model/{name}".format
    page_order = [  # (heading id, the plots it heads); a heading with nothing under it is hidden
        ("how-good", ["summary", "categories", "detection_by_level", "plots/summary.png"]),
        ("how-sure", ["intervals", "pairwise"]),
        ("where-it-fails", []),
        ("curves", ["image_roc", "image_pr", "pixel_roc", "pro"]),
        ("decisions", [per_model(here=here, m=m, name="confusion.csv") for m in models]),
        ("scores", [per_model(here=here, m=m, name="scores.csv") for m in models]),
        ("maps", [per_model(here=here, m=m, name="figures/heatmaps.png") for m in with_maps]),
        ("distributions", [per_model(here=here, m=m, name="figures/scores.png") for m in models]),
        ("how-it-trained", [per_model(here=here, m=m, name="train/plots/custom/losses.json") for m in trained]),
        ("the-data", [f"{here}/overview.png", *(f"{here}/{b}.tsne.csv" for b in backbones)]),
    ]
    assert {p for _, plots in page_order for p in plots} == expected_vega | expected_images
    layout = page_layout(out / "index.html", tmp_path / "chromium")
    undrawn = [p["id"] for p in layout["plots"] if not p["drawn"]]
    assert not undrawn, f"charts not drawn (a template the inlined Vega-Lite rejects?): {undrawn}"
    headings = {h["id"]: h for h in layout["headings"]}
    assert [h["id"] for h in layout["headings"] if h["shown"]] == [heading for heading, _ in page_order]
    assert [headings[h]["text"] for h in ("how-good", "how-sure", "where-it-fails", "how-it-trained")] == [
        "How good is each model?",
        "How sure are these numbers?",
        "Where does it fail?",
        "How did it train?",
    ]
    tops = [headings[heading]["top"] for heading, _ in page_order]
    assert tops == sorted(tops) and len(set(tops)) == len(tops), "the headings are out of order"
    plots_at = {p["id"]: p for p in layout["plots"]}
    for (heading, plots), below in zip(page_order, [*tops[1:], float("inf")]):
        for plot in plots:
            where = plots_at[div_id(plot)]
            assert headings[heading]["top"] < where["top"] < below, f"{plot} is not under the heading {heading}"
    for first, second in [("summary", "categories"), ("image_roc", "image_pr"), ("image_pr", "pixel_roc"),
                          ("pixel_roc", "pro"), ("intervals", "pairwise")]:
        assert (plots_at[first]["top"], plots_at[first]["left"]) < (plots_at[second]["top"], plots_at[second]["left"])
    for image in expected_images:  # DVC captions an image with its path; the page says what it shows
        caption = plots_at[div_id(image)]["caption"]
        assert caption and "/" not in caption.replace("plots/summary.png", ""), f"{image}: caption {caption!r}"
        if ".model/" in image:
            assert chart_model(image) in caption and "carpet" in caption, f"{image}: caption {caption!r}"


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's (.ci/run installs them)


def chart_title(spec: dict) -> str:
    title = spec.get("title", "")
    return title.get("text", "") if isinstance(title, dict) else title


def div_id(plot: str) -> str:
    """The id of a plot's div on DVC's page (what the page template's CSS places)."""
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(plot)


def page_layout(index: Path, profile: Path) -> dict:
    """The page in headless Chromium once every chart is drawn (or 30 s passed): each heading of the
    template (id, text, top, shown) and each plot's div (id, top, left, drawn, caption), in page pixels."""
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    script = """
      const out = {headings: [], plots: []};
      for (const el of document.querySelector('main.report').children) {
        const box = el.getBoundingClientRect(), top = box.top + window.scrollY;
        if (el.tagName === 'HEADER') {
          out.headings.push({id: el.id, text: el.querySelector('h2, h3').textContent, top: top,
                             shown: getComputedStyle(el).display !== 'none'});
        } else {
          const label = el.querySelector(':scope > p');
          out.plots.push({id: el.id, top: top, left: box.left, drawn: !!el.querySelector('canvas, svg, img'),
                          caption: label ? label.textContent.trim() : null});
        }
      }
      return out;"""
    try:
        driver.get(index.as_uri())
        deadline = time.monotonic() + 30
        layout = driver.execute_script(script)
        while not all(p["drawn"] for p in layout["plots"]) and time.monotonic() < deadline:
            time.sleep(0.2)
            layout = driver.execute_script(script)
        return layout
    finally:
        driver.quit()


def file_hashes(repo: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every file under these outputs (files or folders), by path."""
    import hashlib

    files = [f for out in outputs for f in ([repo / out] if (repo / out).is_file() else (repo / out).rglob("*"))]
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_rerunning_the_seeded_stages_gives_the_same_bytes(workspace, first_run):
    """Every stage with something seeded, its outputs deleted (as DVC does) and run again by hand, writes
    byte-identical outputs: data generation, preprocessing, feature extraction, a trained and an untrained
    fit, an evaluation, a heatmap grid with its reconstructions, the t-SNE; DVC then finds everything up to
    date. (The stage scripts run in this process, each from its own seed; DVC runs them in fresh ones, as
    the tiny project's first run did.)"""
    from tests.conftest import run_stage

    repo = workspace
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    # the stages with anything seeded: generator, split, coreset, training, image selection, t-SNE
    stages = [
        "download@carpet",
        "preprocess@carpet",
        "extract@carpet-efficientnet_lite0",
        "fit@carpet-skipae_ssim",
        "fit@carpet-patchcore_effnet",
        "evaluate@carpet-patchcore_effnet",
        "figures@carpet-skipae_ssim",
        "tsne@carpet-efficientnet_lite0",
    ]
    outputs = [out["path"] for stage in stages for out in lock[stage]["outs"]]
    before = file_hashes(repo, outputs)
    assert len(before) > 50 and any(path.endswith(".png") for path in before)
    for stage in stages:  # in pipeline order: each reads what the one before wrote again
        module, names = stage.split("@")
        for out in lock[stage]["outs"]:
            path = repo / out["path"]
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        run_stage(module, *names.split("-"), cwd=repo, check=True)
    assert file_hashes(repo, outputs) == before
    assert read_metrics(repo) == first_run
    assert "Data and pipelines are up to date" in dvc(repo, "status")


SHARE = "docs/how-to/share-and-sweep.md"


def shell(command: str, cwd: Path) -> str:
    """One documented command line, as written, in a shell: its output; a failure shows it."""
    env = dict(os.environ, TQDM_DISABLE="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(cwd),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid")
    result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_fresh_clone_and_pull_recomputes_nothing(workspace, first_run, tmp_path):
    """docs/how-to/share-and-sweep.md "Share results through a remote", as written: a clone without a remote
    cannot pull (the page says so); once a remote is added, committed and pushed, a clone pulls, `dvc status`
    is clean and `dvc repro` runs nothing."""
    repo = workspace
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")  # dvc.lock committed, as in the repository: no remote
    without = tmp_path / "without-remote"
    subprocess.run(["git", "clone", "-q", str(repo), str(without)], check=True)
    failed = subprocess.run([*DVC, "pull"], cwd=without, capture_output=True, text=True)
    assert failed.returncode != 0 and "No remote provided and no default remote set" in failed.stderr
    assert "No remote provided and no default remote set" in (REPO / SHARE).read_text()
    publish, pull = [docs.commands(SHARE, "Share results through a remote")[i:i + 3] for i in (0, 3)]
    assert publish[0].startswith("dvc remote add -d ") and pull == ["dvc pull", "dvc status", "dvc repro"]
    for command in publish:
        shell(command, repo)
    clone = tmp_path / "clone"  # beside the workspace: the remote's relative path is the same folder for both
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    shell(pull[0], clone)
    assert "Data and pipelines are up to date" in shell(pull[1], clone)
    assert ran(shell(pull[2], clone)) == set()
    assert (tmp_path / "dvc-store").is_dir()  # ../dvc-store, from either


def test_preprocess_param_makes_every_reader_of_the_prepared_images_stale_never_the_download(workspace, first_run):
    repo = workspace
    set_param(repo, "preprocess.seed", 1)  # another validation split
    categories = yaml.safe_load((repo / "params.yaml").read_text())["data"]["categories"]
    carpet = {s for s in json.loads(dvc(repo, "status", "--json")) if "carpet" in s}
    assert carpet == {"preprocess@carpet"}
    assert ran(dvc(repo, "repro", "--single-item", "preprocess@carpet")) == {"preprocess@carpet"}
    # Every stage that reads the carpet's prepared images is now stale (DVC reruns them and, through
    # their outputs, everything after them); the download is not. Running the whole cascade here would
    # only time DVC's own propagation, which the model-param tests above already exercise. Every
    # model reads the category's feature folder, which holds the prepared images too.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    readers = (
        {"overview@carpet"}
        | {f"extract@carpet-{b}" for b in params["backbones"]}
        | {f"tsne@carpet-{b}" for b in params["backbones"]}
        | {f"{stage}@carpet-{m}" for stage in ("fit", "evaluate", "figures", "export") for m in params["models"]}
    )
    status = set(json.loads(dvc(repo, "status", "--json")))
    assert {s for s in status if "carpet" in s} == readers
    assert {f"preprocess@{c}" for c in categories} - {"preprocess@carpet"} <= status


def git(repo: Path, *args: str) -> None:
    git_user = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", *git_user, *args], cwd=repo, check=True, capture_output=True)


def test_split_across_machines_restores_every_per_category_stage(workspace, tmp_path):
    """A second category from a local folder (grayscale, another source than the synthetic carpet), reproduced
    as docs/how-to/share-and-sweep.md "Split the categories over machines" says, as written: two workers each
    reproduce one category and push the run cache to a shared remote, with no dvc.lock to merge; the assembler
    pulls the run cache and `dvc repro --pull` restores every per-category stage, running only the
    cross-category ones. On the way: adding the category leaves the carpet's stages up to date (worker A, the
    built project, reruns at most the carpet's download, whose output is unchanged), the new category joins the
    category x model tables, a scoring param makes that model's stages stale in every category, and a third
    category makes only its own stages and the report stale."""
    from tests.test_preprocess import make_category

    make_category(tmp_path / "mine" / "tile", grayscale=True, with_masks=True)
    remote = tmp_path / "remote"
    origin = tmp_path / "origin"
    git(tmp_path, "clone", "-q", str(workspace), str(origin))  # the committed project, no results
    params = yaml.safe_load((origin / "params.yaml").read_text())
    # one model: every per-category stage kind, and each further model would cost worker B four stages (the
    # category x model tables with several models: tests/test_report.py; one model's param leaving the others
    # alone: test_the_tutorials_experiment_commands_run)
    params["models"] = {"patchcore_effnet": params["models"]["patchcore_effnet"]}
    params["data"].update(categories=["carpet", "tile"], sources={"tile": "folder"}, folder=str(tmp_path / "mine"))
    for project in (origin, workspace):  # worker A is the built project, at the same commit
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (project / "dvc.yaml").write_text(yaml.safe_dump(with_plot_sources_of(params["models"]), sort_keys=False))
        dvc(project, "remote", "add", "-d", "shared", str(remote))
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "two categories, a shared remote")

    # the carpet's download reads data.sources and data.folder too; its output is unchanged, so nothing after it reruns
    stale = set(json.loads(dvc(workspace, "status", "--json")))
    assert {s for s in stale if "carpet" in s} <= {"download@carpet"}
    worker_a, worker_b, assembling = docs.commands(SHARE, "Split the categories over machines")
    assert "'*@carpet'" in worker_a and "'*@tile'" in worker_b
    assert ran(shell(worker_a, workspace)) <= {"download@carpet"}
    # worker B: the tile
    worker = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(origin), str(worker))
    assert {s.split("@")[1].split("-")[0] for s in ran(shell(worker_b, worker))} == {"tile"}
    # the assembler
    repo = tmp_path / "c"
    git(tmp_path, "clone", "-q", str(origin), str(repo))
    output = shell(assembling, repo)
    # the cross-category stages; the page template is a cached output, so worker A's run cache may hold it too
    assert (
        {"compare", "report", "summary_figure"} <= ran(output) <= {"compare", "report", "summary_figure", "plots_page"}
    )
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", output))
    per_category = {f"{stage}@{c}" for stage in ("download", "preprocess", "overview") for c in ("carpet", "tile")}
    per_category |= {
        f"{stage}@{c}-{m}"
        for stage in ("fit", "evaluate", "figures", "export")
        for c in ("carpet", "tile")
        for m in params["models"]
    }
    per_category |= {f"{stage}@{c}-efficientnet_lite0" for stage in ("extract", "tsne") for c in ("carpet", "tile")}
    assert per_category <= restored
    assert "Data and pipelines are up to date" in dvc(repo, "status")

    # the new category in the cross-category tables
    tile = json.loads((repo / "metrics/models/tile.category/patchcore_effnet.metrics.json").read_text())
    carpet = json.loads((repo / "metrics/models/carpet.category/patchcore_effnet.metrics.json").read_text())
    assert tile["category"] == "tile" and tile["image_auroc"] == 1.0  # bright squares on a dark grid
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary["categories"]) == {"carpet", "tile"}
    mean = (tile["image_auroc"] + carpet["image_auroc"]) / 2
    assert summary["mean"]["patchcore_effnet"]["image_auroc"] == pytest.approx(mean)
    assert summary["categories"]["tile"]["patchcore_effnet"]["image_auroc"] == tile["image_auroc"]
    table = (repo / "metrics/categories.csv").read_text().splitlines()
    assert table[0] == "metric,category,patchcore_effnet"
    assert [row.split(",")[:2] for row in table[1:4]] == [
        ["image_auroc", "carpet"],
        ["image_auroc", "tile"],
        ["image_auroc", "mean"],
    ]
    markdown = (repo / "metrics/summary.md").read_text()
    assert "## Image AUROC" in markdown and "| **mean** |" in markdown and "| tile |" in markdown
    shown = dvc_json(repo, "plots", "show")["data"]
    cells = shown["categories"][0]["content"]["data"]["values"]
    assert {(v["category"], v["model"]) for v in cells} >= {("tile", "patchcore_effnet"), ("mean", "patchcore_effnet")}

    # one model's scoring param: that model's stages in every category, and the report
    neighbours = "models.patchcore_effnet.score.num_neighbors"
    set_param(repo, neighbours, 3)
    assert set(json.loads(dvc(repo, "status", "--json"))) == {
        f"{stage}@{c}-patchcore_effnet" for stage in ("evaluate", "figures") for c in ("carpet", "tile")
    } | {"compare", "report"}
    set_param(repo, neighbours, params["models"]["patchcore_effnet"]["score"]["num_neighbors"])
    # a third category (synthetic, the default source): only its own stages and the cross-category ones
    set_param(repo, "data.categories", ["carpet", "tile", "grid"])
    grid = {"download@grid", "preprocess@grid", "extract@grid-efficientnet_lite0", "overview@grid",
            "tsne@grid-efficientnet_lite0"}
    grid |= {f"{stage}@grid-{m}" for stage in ("fit", "evaluate", "figures", "export") for m in params["models"]}
    assert set(json.loads(dvc(repo, "status", "--json"))) == grid | {"compare", "report"}


def test_the_tutorials_experiment_commands_run(workspace):
    """Every command of docs/tutorial.md's "Change one param" block, as written, on the tiny project: the
    experiment reruns the changed model's stages and the cross-category ones the page names, nothing else
    (beside the re-scoring of the scoring param below). Checked first, without running it: the fit param
    alone makes only that model's fit and the cross-category stages stale.
    Then docs/how-to/share-and-sweep.md's "Compare runs" (the lines it shares with the tutorial run once) and
    its few-shot collection, which finds this experiment among the runs.

    Before the experiment, a scoring param of another model is changed in the workspace (the experiment
    carries it along; one run of the cross-category stages for both): it re-scores only its model (evaluate,
    figures and the export that carries the scoring record; no fit), and the model left alone keeps its
    metrics byte for byte. (Method files are one folder dependency of every model: DVC's matrix items carry a
    model's name, not its method.)"""
    before = read_metrics(workspace)
    coreset = "models.patchcore_effnet.fit.coreset_ratio"
    shipped = yaml.safe_load((workspace / "params.yaml").read_text())["models"]["patchcore_effnet"]["fit"]
    set_param(workspace, coreset, 0.05)
    # that model's fit (the stages after it follow from its outputs) and the cross-category ones, nothing else
    assert set(json.loads(dvc(workspace, "status", "--json"))) == {"fit@carpet-patchcore_effnet", "compare", "report"}
    set_param(workspace, coreset, shipped["coreset_ratio"])
    set_param(workspace, "models.skipae_ssim.score.smoothing_sigma", 2)
    rescored = {"evaluate@carpet-skipae_ssim", "figures@carpet-skipae_ssim"}
    # the report and compare read the list of models, so any models.* change makes them stale (they rerun anyway)
    assert set(json.loads(dvc(workspace, "status", "--json"))) == rescored | {"report", "compare"}

    commands = docs.commands("docs/tutorial.md", "Change one param and rerun only what it affects")
    assert commands[0] == "dvc exp run -S models.patchcore_effnet.fit.coreset_ratio=0.05"
    outputs = [shell(command, workspace) for command in commands]
    model = [f"{stage}@carpet-patchcore_effnet" for stage in ("fit", "evaluate", "figures", "export")]
    # the summary chart follows the report whenever the summary changed, the ONNX export each changed scoring.json
    assert ran(outputs[0]) == {*model, *rescored, "export@carpet-skipae_ssim", "compare", "report",
                               "summary_figure"}, ran(outputs[0])
    assert "patchcore_effnet" in outputs[1]  # dvc metrics diff lists the model's metrics
    after = read_metrics(workspace)
    metrics = "metrics/models/carpet.category/{}.metrics.json".format
    assert after[metrics("skipae_ssim")] != before[metrics("skipae_ssim")]
    assert after[metrics("knn_effnet")] == before[metrics("knn_effnet")]
    compare = docs.commands(SHARE, "Compare runs")
    assert compare[0] == commands[0]  # the same experiment: run once
    for command in compare:
        if command not in commands:
            shell(command, workspace)
    assert (workspace / "dvc_plots" / "index.html").is_file()
    few_shot = docs.commands(SHARE, "Few-shot: how many good images a model needs")
    assert few_shot[0] == "python -m stages.few_shot"
    for command in few_shot:
        shell(command, workspace)
    models = yaml.safe_load((workspace / "params.yaml").read_text())["models"]
    rows = (workspace / "plots" / "few_shot.csv").read_text().splitlines()
    assert rows[0] == "model,n_train,image_auroc,pixel_auroc"
    assert {row.split(",")[0] for row in rows[1:]} == set(models)  # one size (all images), every model
    page = (workspace / "dvc_plots" / "few_shot" / "index.html").read_text()
    assert "n_train" in page and all(model in page for model in models)


def test_the_tutorials_scoring_commands_and_the_benchmark_run(workspace):
    """Every command of docs/tutorial.md's "Score new images" block, as written, on the tiny project (its
    carpet and its patchcore_effnet), and `python -m stages.benchmark` on one model."""
    import csv

    from tests.docs import commands as page_commands

    commands = page_commands("docs/tutorial.md", "Score new images")
    assert commands and all(c.startswith("python -m stages.predict ") for c in commands)
    # every hole of the clearly visible level is flagged (those at the just-noticeable difference may not be)
    levels = csv.DictReader(open(workspace / "data/raw/carpet.dataset/levels.csv"))
    clear_holes = {Path(r["image"]).name for r in levels if r["image"].startswith("test/hole/") and r["level"] == "1"}
    checked = 0
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(workspace))
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=workspace, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        out = workspace / command.split("--out ")[1].split()[0]
        rows = list(csv.DictReader(open(out / "scores.csv")))
        assert rows and all((out / row["overlay"]).is_file() for row in rows), command
        holes = [row for row in rows if "/hole/" in row["image"] and Path(row["image"]).name in clear_holes]
        assert all(row["anomalous"] == "1" for row in holes), command  # flagged on both runtimes
        checked += len(holes)
    assert checked, "no command scored a hole"
    from tests.conftest import run_stage  # in this process: the benchmark times its fit in a child of its own

    bench = run_stage("benchmark", "--models", "knn_effnet", "--repeats", "1", "--out", str(workspace / "cost"),
                      cwd=workspace)
    assert bench.returncode == 0, bench.stderr
    cost = json.loads((workspace / "cost.json").read_text())
    row = next(r for r in cost["models"] if r["model"] == "knn_effnet")
    assert row["torch_ms_per_image"] > 0 and row["onnx_ms_per_image"] > 0 and row["fit_s"] > 0
    assert row["onnx_score_rel_diff"] <= 1e-4  # the export's parity, measured again
    assert "| knn_effnet |" in (workspace / "cost.md").read_text() and (workspace / "cost.png").stat().st_size > 1000
