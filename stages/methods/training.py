"""What the trained methods (autoencoder, skip_autoencoder, feature_ae) share.

- `resolve_hparams`: params.yaml entry + method defaults, unknown names rejected with a one-line error;
- `train`: one generic Adam loop with early stopping on the validation loss, the best epoch's
  weights kept in memory, a tqdm bar, a per-epoch history and a NaN/inf guard;
- `gaussian_smooth` / `score_maps`: the anomaly-map post-processing.

Determinism: the caller seeds the weight initialisation (`seed_everything(seed)` right before it
builds the network); shuffling uses a private torch.Generator seeded with the same seed, so the
same params and data give bit-identical weights on CPU.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from stages.common import PipelineError, seed_everything
from stages.methods.base import AnomalyDetector, Prediction, TrainingDiverged

# The hparams every trained method accepts, with their defaults.
TRAINING_DEFAULTS: dict[str, Any] = dict(lr=1e-3, epochs=30, batch_size=8, patience=5, seed=0, smoothing_sigma=4.0)

LossFn = Callable[[nn.Module, Tensor], Tensor]


def resolve_hparams(method: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Fill in defaults, reject unknown names and check the training hparams' ranges."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise PipelineError(
            f"params.yaml: unknown parameter(s) {', '.join(repr(u) for u in unknown)} for method "
            f"'{method}' (known: {', '.join(sorted(defaults))})"
        )
    hp = {**defaults, **given}

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise PipelineError(f"params.yaml: '{name}' of method '{method}' must be {what}, got {hp[name]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    if "lr" in hp:
        need(is_num(hp["lr"]) and hp["lr"] > 0, "lr", "a positive number")
    if "epochs" in hp:
        need(is_int(hp["epochs"]) and hp["epochs"] >= 1, "epochs", "an integer >= 1")
    if "batch_size" in hp:
        need(is_int(hp["batch_size"]) and hp["batch_size"] >= 1, "batch_size", "an integer >= 1")
    if "patience" in hp:
        need(hp["patience"] is None or (is_int(hp["patience"]) and hp["patience"] >= 0), "patience",
             "an integer >= 0 (0 or null: no early stopping)")
    if "seed" in hp:
        need(is_int(hp["seed"]), "seed", "an integer")
    if "smoothing_sigma" in hp:
        need(is_num(hp["smoothing_sigma"]) and hp["smoothing_sigma"] >= 0, "smoothing_sigma", "a number >= 0")
    if "score" in hp:
        need(hp["score"] in ("max", "mean"), "score", "'max' or 'mean'")
    return hp


def _check_finite(loss: float, epoch: int) -> None:
    if not math.isfinite(loss):
        kind = "NaN" if math.isnan(loss) else "infinite"
        raise TrainingDiverged(f"loss became {kind} at epoch {epoch}")


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, data: Tensor, batch_size: int, device: str) -> float:
    """Mean loss over `data` (weighted by batch size), model in eval mode."""
    model.eval()
    total = 0.0
    for idx in _batches(len(data), batch_size, None):
        total += float(loss_fn(model, data[idx].to(device))) * len(idx)
    return total / len(data)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Tensor,
    val_data: Tensor | None,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    patience: int | None,
    seed: int,
    device: str = "cpu",
    desc: str = "fit",
) -> list[dict]:
    """Train `model` in place with Adam; return the history [{epoch, train_loss, val_loss}, ...].

    `loss_fn(model, batch)` returns the mean loss of a batch (already on `device`). Early stopping
    watches the validation loss (the training loss when there is no validation data) and stops
    after `patience` epochs without improvement (0/None: never). On return the model holds the
    weights of the best epoch. Raises TrainingDiverged as soon as a loss is NaN or infinite.
    """
    if len(train_data) == 0:
        raise PipelineError("no training images to fit on")
    if val_data is not None and len(val_data) == 0:
        val_data = None
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))

    history: list[dict] = []
    best_loss, best_state, stale = math.inf, None, 0
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        model.train()
        total = 0.0
        for idx in _batches(len(train_data), batch_size, generator):
            loss = loss_fn(model, train_data[idx].to(device))
            value = loss.item()
            _check_finite(value, epoch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += value * len(idx)
        train_loss = total / len(train_data)
        val_loss = None
        if val_data is not None:
            val_loss = evaluate(model, loss_fn, val_data, batch_size, device)
            _check_finite(val_loss, epoch)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.4g}", val="-" if val_loss is None else f"{val_loss:.4g}")

        monitored = train_loss if val_loss is None else val_loss
        if monitored < best_loss:
            best_loss, stale = monitored, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if patience and stale >= patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def fit_network(detector, build_net: Callable[[], nn.Module], loss_fn: LossFn, x_train: Tensor, x_val: Tensor | None) -> None:
    """Seed, build and train a trained detector's network; set detector.net/history only on success."""
    hp = detector.hp
    seed_everything(hp["seed"])  # weight initialisation
    net = build_net()
    history = train(
        net, loss_fn, x_train, x_val,
        lr=hp["lr"], epochs=hp["epochs"], batch_size=hp["batch_size"], patience=hp["patience"],
        seed=hp["seed"], device=detector.device, desc=detector.method,
    )
    detector.net, detector.history = net, history


def gaussian_smooth(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, H, W) maps (reflect padding, kernel truncated at 4 sigma)."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    radius = max(1, min(int(4.0 * sigma + 0.5), h - 1, w - 1))
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(coords**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def finish_maps(raw: Tensor, size: tuple[int, int], sigma: float, score: str = "max") -> tuple[Tensor, Tensor]:
    """(N, h, w) raw error maps -> maps upsampled bilinearly to `size` and smoothed, plus image scores."""
    maps = raw.unsqueeze(1)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    maps = gaussian_smooth(maps.squeeze(1), sigma)
    flat = maps.flatten(1)
    scores = flat.amax(1) if score == "max" else flat.mean(1)
    return maps, scores


@torch.no_grad()
def predict_error_maps(
    net: nn.Module,
    inputs: Tensor,
    error_maps: Callable[[Tensor, Tensor], Tensor],
    *,
    size: tuple[int, int],
    batch_size: int,
    sigma: float,
    score: str,
    device: str,
    desc: str,
):
    """Reconstruct `inputs` batch by batch; error maps -> Prediction at the image `size`."""
    net = net.to(device).eval()
    scores, maps = [], []
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch"):
        x = inputs[start : start + batch_size].to(device)
        m, s = finish_maps(error_maps(net(x), x), size, sigma, score)
        maps.append(m.cpu())
        scores.append(s.cpu())
    if not maps:
        return Prediction(np.zeros(0, np.float64), np.zeros((0, *size), np.float32))
    return Prediction(image_scores=torch.cat(scores).double().numpy(), anomaly_maps=torch.cat(maps).float().numpy())


class ReconstructionDetector(AnomalyDetector):
    """A trained method whose anomaly map is a reconstruction error: shared predict and save/load.

    Subclasses say how to build the network, what it reconstructs (`model_inputs`) and at which
    image size the maps come back (`image_size`); `error_maps` defaults to the squared error
    summed over channels.
    """

    net: nn.Module | None = None

    def build_net(self) -> nn.Module:
        raise NotImplementedError

    def model_inputs(self, inputs) -> Tensor:
        raise NotImplementedError

    def image_size(self, inputs) -> tuple[int, int]:
        raise NotImplementedError

    def error_maps(self, recon: Tensor, x: Tensor) -> Tensor:
        """(N, C, h, w) pair -> (N, h, w) raw anomaly maps at the model resolution."""
        return (recon - x).pow(2).sum(1)

    def predict(self, inputs) -> Prediction:
        if self.net is None:
            raise PipelineError(f"{self.method}: predict() called before fit() or load()")
        return predict_error_maps(
            self.net, self.model_inputs(inputs), self.error_maps,
            size=self.image_size(inputs), batch_size=self.hp["batch_size"],
            sigma=float(self.hp["smoothing_sigma"]), score=self.hp["score"], device=self.device, desc="score",
        )

    def get_state(self) -> dict:
        if self.net is None:
            raise PipelineError(f"{self.method}: nothing to save, the model was not fitted")
        return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}}

    def set_state(self, state: dict) -> None:
        net = self.build_net()
        net.load_state_dict(state["net"])
        self.net = net.to(self.device).eval()
