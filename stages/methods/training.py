"""What the trained methods (autoencoder, skip_autoencoder, feature_ae, feature_vae) share.

- `TrainingFit` / `MapScore`: the fitting and scoring params every trained method accepts;
- `train`: one generic Adam loop with early stopping on the validation loss, the best epoch's
  weights kept in memory, a tqdm bar, a per-epoch history and a NaN/inf guard;
- `ReconstructionDetector`: the scorer (reconstruction error -> maps -> scores, through the MapHead)
  and the network's state (predict, save and load are the base class's, stages/methods/base.py);
- `PixelFit` / `PixelReconstructionDetector`: what the two pixel autoencoders add on top;
- `FeatureFit` / `FeatureReconstructionDetector`: the same for the feature (V)AEs on cached maps.

Determinism: the caller seeds the weight initialisation (`seed_everything(seed)` right before it
builds the network); shuffling uses a private torch.Generator seeded with the same seed, so the
same params and data give bit-identical weights on CPU.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from stages.core.device import seed_everything
from stages.core.errors import PipelineError
from stages.core.schema import Schema, SchemaError, option
from stages.features.cache import finest_grid
from stages.methods.base import AnomalyDetector, TrainingDiverged
from stages.methods.maps import IMAGE_SCORES, MAX_SMOOTHING_SIGMA, MapHead, resize_matrix
from stages.methods.neighbours import exact_sqrt

LossFn = Callable[[nn.Module, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class TrainingFit(Schema):
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    epochs: int = option(30, "maximum training epochs", ge=1)
    batch_size: int = option(8, "training mini-batch size", ge=1)
    patience: int | None = option(
        5, "early stopping: epochs without validation improvement (0 or null: never stop early)", ge=0
    )


@dataclasses.dataclass(frozen=True)
class MapScore(Schema):
    image_score: str = option("max", "how the anomaly map becomes the image score", choices=IMAGE_SCORES)
    smoothing_sigma: float = option(4.0, "Gaussian blur of the anomaly map, in pixels of the prepared image",
                                   ge=0, le=MAX_SMOOTHING_SIGMA)
    batch_size: int = option(8, "images scored at once", ge=1)


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
    # fused: one kernel of torch's own, whose square root is the same on every CPU (the default
    # implementation's float32 sqrt goes through MKL and differs between Intel and AMD)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
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


def fit_network(
    detector, build_net: Callable[[], nn.Module], loss_fn: LossFn, x_train: Tensor, x_val: Tensor | None
) -> None:
    """Seed, build and train a trained detector's network; set detector.net/history only on success."""
    fit = detector.fit_params
    seed_everything(detector.seed)  # weight initialisation (and the VAE's samples)
    net = build_net()
    history = train(
        net,
        loss_fn,
        x_train,
        x_val,
        lr=fit.lr,
        epochs=fit.epochs,
        batch_size=fit.batch_size,
        patience=fit.patience,
        seed=detector.seed,
        device=detector.device,
        desc=detector.method,
    )
    detector.net, detector.history = net, history


class ReconstructionScorer(nn.Module):
    """The method's inputs -> (image scores, maps): the network's reconstruction error as a raw map
    (`error_maps`), upsampled, smoothed and reduced to a score by the MapHead."""

    def __init__(
        self, inputs: nn.Module, net: nn.Module, error_maps: Callable[[Tensor, Tensor], Tensor], head: nn.Module
    ):
        super().__init__()
        self.inputs, self.net, self.head = inputs, net, head
        self.error_maps = error_maps  # the detector's: uses the same network (the VAE's posterior)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inputs(*inputs)
        return self.head(self.error_maps(self.net(x), x))


class ReconstructionDetector(AnomalyDetector):
    """A trained method whose anomaly map is a reconstruction error: shared predict and save/load.

    Subclasses say how to build the network, what it reconstructs (`model_inputs`) and at which
    image size the maps come back (`image_size`); `error_maps` defaults to the squared error
    summed over channels.
    """

    Score = MapScore
    net: nn.Module | None = None
    fitted_attributes = ("net",)

    def draws_random_numbers(self) -> bool:
        return True  # weight initialisation and shuffling

    def build_net(self) -> nn.Module:
        raise NotImplementedError

    def input_module(self, image_size: tuple[int, int]) -> nn.Module:
        """What the network reads, as a module of the scorer's inputs (the same transform fit() uses)."""
        raise NotImplementedError

    def error_maps(self, recon: Tensor, x: Tensor) -> Tensor:
        """(N, C, h, w) pair -> (N, h, w) raw anomaly maps at the model resolution."""
        return (recon - x).pow(2).sum(1)

    def scorer(self, image_size: tuple[int, int]) -> ReconstructionScorer:
        self._require_fitted()
        score = self.score_params
        head = MapHead(image_size, float(score.smoothing_sigma), score.image_score)
        return ReconstructionScorer(self.input_module(image_size), self.net.eval(), self.error_maps, head)

    def get_state(self) -> dict:
        return {"net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}}

    def set_state(self, state: dict) -> None:
        net = self.build_net()
        net.load_state_dict(state["net"])
        self.net = net.to(self.device).eval()


@dataclasses.dataclass(frozen=True)
class PixelFit(TrainingFit):
    image_size: int = option(
        128,
        "training / scoring resolution, a multiple of 2 ** len(channels); maps are upsampled to the prepared size",
        ge=1,
    )
    channels: list[int] = option([32, 64, 128, 256], "encoder widths, one stride-2 level each", ge=1)
    latent: int = option(16, "bottleneck channels at 1 / 2**len(channels) of the resolution", ge=1)

    def validate_block(self) -> None:
        factor = 2 ** len(self.channels)
        if self.image_size % factor:
            raise SchemaError(
                "image_size", f"must be a multiple of {factor} (2 ** len(channels)), got {self.image_size}"
            )


class UnitImages(nn.Module):
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float32 in [0, 1], resized with torch's antialiased
    bilinear weights as two matrix products (stages/methods/maps.py resize_matrix)."""

    def __init__(self, image_size: tuple[int, int], size: int):
        super().__init__()
        self.resize = tuple(image_size) != (size, size)
        if self.resize:
            self.register_buffer("rows", resize_matrix(image_size[0], size), persistent=False)
            self.register_buffer("columns", resize_matrix(image_size[1], size).t().contiguous(), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if self.resize:
            x = (self.rows @ x @ self.columns).clamp(0.0, 1.0)
        return x.contiguous()


def to_unit_tensor(images: np.ndarray, size: int) -> Tensor:
    """Prepared images as the pixel networks read them (training data; scoring uses the module itself)."""
    return UnitImages(tuple(images.shape[1:3]), size)(torch.from_numpy(np.ascontiguousarray(images)))


class PixelReconstructionDetector(ReconstructionDetector):
    """An autoencoder on the prepared images: scaled to [0, 1] and resized to `image_size`."""

    uses = "pixels"
    Fit = PixelFit

    def loss(self, net: nn.Module, x: Tensor) -> Tensor:
        return F.mse_loss(net(x), x)

    def model_inputs(self, split) -> Tensor:
        return to_unit_tensor(split.images, self.fit_params.image_size)

    def input_module(self, image_size: tuple[int, int]) -> nn.Module:
        return UnitImages(image_size, self.fit_params.image_size)

    @torch.no_grad()
    def reconstruct(self, split) -> np.ndarray:
        """(N, H, W, 3) float32 in [0, 1]: the network's output at the prepared size (for figures)."""
        self._require_fitted()
        x, size, out = self.model_inputs(split), split.image_size, []
        net, batch = self.net.to(self.device).eval(), self.score_params.batch_size
        for start in range(0, len(x), batch):
            recon = net(x[start : start + batch].to(self.device)).cpu()
            out.append(F.interpolate(recon, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0))
        if not out:
            return np.zeros((0, *size, 3), np.float32)
        return torch.cat(out).permute(0, 2, 3, 1).numpy().astype(np.float32)

    def fit(self, train_split, val=None) -> "PixelReconstructionDetector":
        x_val = self.model_inputs(val) if val is not None and len(val) > 0 else None
        fit_network(self, self.build_net, self.loss, self.model_inputs(train_split), x_val)
        return self


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclasses.dataclass(frozen=True)
class FeatureFit(TrainingFit):
    neighbourhood: int = option(
        3, "average each feature over this window first (1: off)", ge=1, check=_odd, allowed="an odd integer >= 1"
    )


def combine_layers(maps: list[Tensor], neighbourhood: int) -> Tensor:
    """Each layer averaged over `neighbourhood` (stride 1, borders not padded), upsampled to the finest
    grid, concatenated along channels: (N, C, h, w)."""
    grid = finest_grid(maps)
    out = []
    for m in maps:
        m = m.float()
        if neighbourhood > 1:
            m = F.avg_pool2d(m, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        if tuple(m.shape[-2:]) != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


class FeatureInputs(nn.Module):
    """Feature maps -> the feature (V)AE's input: combined layers standardised with the training mean / std."""

    def __init__(self, neighbourhood: int, mean: Tensor, std: Tensor, method: str):
        super().__init__()
        self.neighbourhood, self.method = neighbourhood, method
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, *maps: Tensor) -> Tensor:
        x = combine_layers(list(maps), self.neighbourhood)
        if x.shape[1] != self.mean.shape[1]:
            raise PipelineError(
                f"{self.method}: features have {x.shape[1]} channels but the model was fitted on "
                f"{self.mean.shape[1]} (re-run the fit stage)"
            )
        return (x - self.mean) / self.std


def conv1x1_block(c_in: int, c_out: int) -> list[nn.Module]:
    """A per-location layer of the feature (V)AEs: 1x1 convolution, BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FeatureReconstructionDetector(ReconstructionDetector):
    """A network on cached backbone maps (DFR): every layer averaged over `neighbourhood`, upsampled to
    the finest grid, concatenated and standardised per channel with the training mean / std."""

    uses = "features"
    Fit = FeatureFit
    mean: Tensor | None = None
    std: Tensor | None = None
    fitted_attributes = ("net", "mean", "std")

    def loss(self, net: nn.Module, x: Tensor) -> Tensor:
        return F.mse_loss(net(x), x)

    def _raw_features(self, features) -> Tensor:
        """FeatureSet -> (N, C, h, w) float32 on the finest grid, not yet standardised."""
        maps = features.maps()
        if not maps:
            raise PipelineError(f"{self.method}: the feature cache holds no feature maps")
        return combine_layers(maps, self.fit_params.neighbourhood)

    def model_inputs(self, features) -> Tensor:
        return self.input_module(features.image_size)(*features.maps())

    def input_module(self, image_size: tuple[int, int]) -> nn.Module:
        return FeatureInputs(self.fit_params.neighbourhood, self.mean, self.std, self.method)

    def fit(self, train_features, val=None) -> "FeatureReconstructionDetector":
        x = self._raw_features(train_features)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = exact_sqrt(x.var(dim=(0, 2, 3), keepdim=True))
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channels: just centre them
        x = (x - mean) / std
        x_val = (self._raw_features(val) - mean) / std if val is not None and len(val) > 0 else None
        self.mean, self.std = mean, std
        fit_network(self, self.build_net, self.loss, x, x_val)
        return self

    def get_state(self) -> dict:
        return {**super().get_state(), "mean": self.mean.clone(), "std": self.std.clone()}

    def set_state(self, state: dict) -> None:
        self.mean, self.std = state["mean"].float(), state["std"].float()
        super().set_state(state)
