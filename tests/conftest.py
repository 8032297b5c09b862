"""Shared test helpers: run a stage script as DVC would, in a scratch project folder."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of in-process stage calls
# Two pytest-xdist workers on two cores, each starting processes that run OpenMP with two threads
# (numerics: strict): an idle OpenMP thread spins for a while before it sleeps, taking a core the other
# worker needs. PASSIVE makes it sleep at once. The numbers are the same either way (it only changes how
# a thread waits); the suite took 344 s with spinning threads, 306 s without.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]


def run_stage(module: str, *args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m stages.<module> args` with cwd as the project root (params.yaml, data/ live there): its exit
    code, stdout and stderr, run in this process through the stage's own run_main (no interpreter and torch
    start-up, ~3 s a call). What only a process start shows (the environment numerics set on import, progress
    bars, a server that must exit) is tested on a `python -m` subprocess of its own."""
    result = run_in_process(module, *args, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"stage {module} failed:\n{result.stderr}")
    return result


@contextlib.contextmanager
def as_stage(module: str, args: tuple[str, ...], cwd: Path):
    """This process as `python -m stages.<module> args` run in `cwd` sees it (cwd and argv), restored after."""
    previous_dir, previous_argv = Path.cwd(), sys.argv
    os.chdir(cwd)
    sys.argv = [f"stages/{module}.py", *args]
    try:
        yield importlib.import_module(f"stages.{module}")
    finally:
        os.chdir(previous_dir)
        sys.argv = previous_argv


def call_stage(module: str, *args: str, cwd: Path) -> None:
    """Run a stage's main() in this process (no interpreter start-up): for setting up a test's data.

    A failure raises the stage's PipelineError; tests of the command-line behaviour use run_stage.
    """
    with as_stage(module, args, cwd) as stage:
        stage.main()


def run_in_process(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m stages.<module> args` as run_stage runs it (exit code, stdout, stderr through the stage's
    own run_main), in this process: no interpreter and torch start-up, about 3 s less a call. A test of
    start-up itself (the numerics environment, signals, progress bars) starts `python -m` in a subprocess."""
    from stages.core.cli import run_main

    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with as_stage(module, args, cwd) as stage, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(stage.main)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return subprocess.CompletedProcess(["python", "-m", f"stages.{module}", *args], code, out.getvalue(),
                                       err.getvalue())


def as_from_a_terminal() -> None:
    """preexec_fn of a child a test stops with Ctrl-C (SIGINT): the default action, unblocked, as a shell
    starts a command. A child inherits an ignored or blocked SIGINT from its parent, and under pytest-xdist
    the workers' children were seen deaf to it (the test then hangs); the tools themselves are not."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def error_line(result: subprocess.CompletedProcess) -> str:
    """The stage's one-line error: exit code 1, no traceback, last stderr line starts with 'error:'."""
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test, its fixtures' set-up and tear-down included, leaves this worker's Ctrl-C as it found it:
    neither ignored nor blocked. A child process inherits both (and Python installs its KeyboardInterrupt
    handler only over the default), so one left that way makes every later child of this worker deaf to
    Ctrl-C, and the --watch and demo tests that stop their child with SIGINT hang. Set CTRL_C_LOG to a file
    to record which test changed it."""
    import signal

    def state():
        return signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])

    before = state()
    yield
    after = state()
    if after != before:
        signal.signal(signal.SIGINT, before[0])
        signal.pthread_sigmask(signal.SIG_UNBLOCK if not before[1] else signal.SIG_BLOCK, [signal.SIGINT])
        with open(os.environ.get("CTRL_C_LOG", os.devnull), "a") as log:
            log.write(f"{item.nodeid}: SIGINT (handler, blocked) {before} -> {after}\n")


@pytest.fixture(autouse=True)
def user_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh user cache for each test: data.download_dir defaults to $XDG_CACHE_HOME/anomaly-pipeline,
    and no test may read or fill the real one (shared by every run on the machine). Torch and
    matplotlib keep their own caches where they were (weights, the font list)."""
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    monkeypatch.setenv("TORCH_HOME", os.environ.get("TORCH_HOME") or str(home_cache / "torch"))
    monkeypatch.setenv("MPLCONFIGDIR", os.environ.get("MPLCONFIGDIR") or str(home_cache / "matplotlib"))
    cache = tmp_path_factory.mktemp("user-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty scratch project folder with the repo's params.yaml."""
    write_params(tmp_path, default_params())
    return tmp_path


# A tiny project with a model of every method fitted (two seeds), evaluated and exported in-process
# (predict, demo and export tests).
MODELS_FITTED = {
    "pc": {"method": "patchcore", "backbone": "efficientnet_lite0",
           "fit": {"coreset_ratio": 0.5, "pretrain_embed_dimension": 32, "target_embed_dimension": 32}},
    "ae": {"method": "autoencoder", "backbone": "pixels",
           "fit": {"image_size": 32, "channels": [8, 16], "latent": 4, "epochs": 2}},
}
EVERY_METHOD = {
    **MODELS_FITTED,
    "knn": {"method": "global_knn", "backbone": "efficientnet_lite0", "score": {"k": 3}},
    "pc7": {"method": "patchcore", "backbone": "efficientnet_lite0",  # the paper's eq. 7 image score
            "fit": {"coreset_ratio": 0.5, "pretrain_embed_dimension": 32, "target_embed_dimension": 32},
            "score": {"reweight": True, "num_neighbors": 3}},
    "skip": {"method": "skip_autoencoder", "backbone": "pixels",
             "fit": {"image_size": 32, "channels": [8, 16], "latent": 4, "epochs": 2, "loss": "ssim"}},
    "fae": {"method": "feature_ae", "backbone": "efficientnet_lite0", "fit": {"latent": 8, "epochs": 2}},
    "fvae": {"method": "feature_vae", "backbone": "efficientnet_lite0", "fit": {"latent": 8, "epochs": 2},
             "score": {"anomaly_map": "elbo"}},
}


def _with_every_registered_method(models: dict) -> dict:
    """`models` plus, for each registered method it lacks, that method's first model in params.yaml (a
    couple of epochs if it trains): a new method is in every predict, demo and export test with no line here."""
    from stages.methods import REGISTRY

    models = dict(models)
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["models"]
    for name, model in shipped.items():
        if model["method"] in REGISTRY and model["method"] not in {m["method"] for m in models.values()}:
            fit = dict(model.get("fit") or {})
            if "epochs" in fit:
                fit["epochs"] = 2
            models[name] = {**model, "fit": fit}
    missing = set(REGISTRY) - {m["method"] for m in models.values()}
    assert not missing, f"no model in params.yaml for the registered methods {sorted(missing)}"
    return models


EVERY_METHOD = _with_every_registered_method(EVERY_METHOD)


def once_per_run(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once for all pytest-xdist workers of this run (the first to ask builds, the others
    wait for it), into a folder of the run's shared temporary directory; returns that folder."""
    from filelock import FileLock

    # the same folder for every xdist worker of this run (their basetemps are its popen-gw* folders); without
    # xdist the run's own basetemp, never the folder every pytest run of this user shares
    basetemp = tmp_path_factory.getbasetemp()
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    root = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker
            build(root)
            (shared / f"{name}.done").touch()
    return root


def build_fitted(project: Path) -> None:
    project.mkdir(parents=True)
    params = default_params()
    params["data"]["synthetic"].update(image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1,
                                       defect_types=["color", "hole"])
    # one clearly visible level, large enough for 64 px images (96 px): the demo must flag the colour defect
    params["data"]["synthetic"]["levels"] = [{"delta_e": 24, "area": 1536, "width": 8}]
    params["preprocess"].update(resize=56, crop_size=48, val_fraction=0.25)
    params["device"] = "cpu"
    params["fit_seeds"] = [3, 4]  # predict and the demo use the first seed's fit, the one evaluate's threshold is for
    params["evaluate"]["bootstrap"]["resamples"] = 20
    params["models"] = EVERY_METHOD
    write_params(project, params)
    for stage, args in [("download", ()), ("preprocess", ()), ("extract", ("efficientnet_lite0",))]:
        call_stage(stage, "carpet", *args, cwd=project)
    for name in EVERY_METHOD:
        for stage in ("fit", "evaluate", "export"):
            call_stage(stage, "carpet", name, cwd=project)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> Path:
    """The small project with a model of every method fitted, evaluated and exported: built once per run,
    copied for each worker (tests of hostile files damage and restore its files in place)."""
    source = once_per_run(tmp_path_factory, "fitted-built", build_fitted)
    project = tmp_path_factory.mktemp("predict")
    shutil.copytree(source, project, dirs_exist_ok=True, symlinks=True)
    return project


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """The tiny DVC project after its first `dvc repro` (tests/tiny.py), built once for all workers."""
    from tests.tiny import build

    return once_per_run(tmp_path_factory, "pipeline-built", build)


@pytest.fixture
def workspace(built, tmp_path) -> Path:
    """This test's own copy of the built tiny project."""
    from tests.tiny import copy_of

    return copy_of(built, tmp_path)


def pytest_collection_modifyitems(config, items):
    """The end-to-end DVC tests share one tiny project, built by whichever test asks first (`built`): one of
    them goes first, so one worker builds while the other runs the longest of the other tests; the rest of
    the end-to-end tests, longest first, follow those, when the project is there; then the xdist groups
    (each runs on one worker, in one piece), then everything else. A long test or group started last
    leaves the other worker idle. (pytest.ini keeps this order: --no-loadscope-reorder.)"""
    pipeline = [item for item in items if "built" in getattr(item, "fixturenames", ())]
    rest = [item for item in items if item not in pipeline]

    def slow(item) -> bool:
        return any(name in item.nodeid for name in SLOW_FIRST)

    def grouped(item) -> bool:
        return any(item.iter_markers("xdist_group"))

    items[:] = [
        *pipeline[:1],
        *[item for item in rest if slow(item)],
        *sorted(pipeline[1:], key=lambda item: not slow(item)),
        *[item for item in rest if not slow(item) and grouped(item)],
        *[item for item in rest if not slow(item) and not grouped(item)],
    ]
    _xdist_groups(config, items)


# the longest tests (a fresh clone's --durations), started early
SLOW_FIRST = ("test_split_across_machines", "test_the_tutorials_experiment_commands_run", "test_queue.py::",
              "test_rerunning_the_seeded_stages", "test_shipped_configs_run_end_to_end",
              "test_a_tiny_stand_in",
              # mostly waiting (a watcher's retries): beside the other worker's busiest tests, not alone at the end
              "test_watch_resumes_survives",
              # 4-8 s each: not at the end, where one of them leaves the other worker idle
              "test_the_allowed_operators_are_exactly", "test_export_runs_on_the_cpu_whatever",
              "test_predict_draws_one_bar_of_its_own", "test_own_folder_to_a_calibrated_detector")


def _xdist_groups(config, items) -> None:
    """`--dist loadgroup` sends the tests of one `xdist_group` to one worker by the `@group` suffix that
    pytest-xdist adds to their node ids; under pytest 9 its `_nodeid` no longer sets the id (now `_id`), so
    every group was spread over both workers and their module-scoped projects built twice. Add it here."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "loadgroup", False)):
        return
    from _pytest.nodes import NodeId

    for item in items:
        suffix = "@" + "_".join(sorted({str(m.args[0]) for m in item.iter_markers("xdist_group")}))
        if suffix != "@" and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)
