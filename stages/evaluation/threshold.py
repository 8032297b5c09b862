"""The one threshold rule of every decision here: evaluate's metrics and confusion counts, the
figures, predict, `--watch` and the demo all call `flagged`, and every threshold is set by a rule
of this module. No sklearn or scipy here: the demo and predict import it without the metrics' dependencies.

Two rules set a threshold from good images' scores:
- mean_std: mean + n·σ of the validation scores (the study's rule; no guarantee of any kind);
- quantile: an order statistic of the good scores, chosen so that the false-alarm rate on new good
  images is at most a target with a stated confidence, whatever the scores' distribution (the
  distribution-free tolerance bound; see `order_statistic_rank`). `python -m stages.calibrate`
  and `evaluate.threshold_rule: quantile` both use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stages.core.errors import PipelineError, warn

THRESHOLD_RULES = ("mean_std", "quantile")


def flagged(scores, threshold) -> np.ndarray:
    """Anomalous when score >= threshold (sklearn's precision_recall_curve rule, so F1-max's threshold
    means the same); a scalar score gives a numpy bool."""
    return np.asarray(scores, dtype=np.float64) >= threshold


def mean_std_threshold(val_scores, n_std=2.0) -> float:
    """The study's rule: mean + n_std * std of held-out good validation scores."""
    val_scores = _finite_scores(val_scores, "validation scores")
    # Sample std (ddof=1) since the validation set is a sample; one score has no spread.
    if val_scores.size == 1:
        warn("one validation image: the threshold is its score (no spread to add); hold out more good images "
             "(preprocess.val_fraction)")
    std = float(np.std(val_scores, ddof=1)) if val_scores.size > 1 else 0.0
    return float(np.mean(val_scores)) + float(n_std) * std


def _finite_scores(scores, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise PipelineError(f"metrics: no {what} to set the threshold from")
    if not np.isfinite(scores).all():
        raise PipelineError(f"metrics: {what} contain NaN or infinite values")
    return scores


def _check_target(false_alarms: float, confidence: float) -> None:
    for name, value in (("false-alarm target", false_alarms), ("confidence", confidence)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise PipelineError(f"{name}: must be a number between 0 and 1 (exclusive), got {value!r}")


def binomial_tails(n: int, p: float) -> np.ndarray:
    """P(Binomial(n, p) >= m) for m = 0..n+1: the pmf from its term ratios in log space (exact to
    float64 rounding for any n), summed from the top so the small upper tail keeps its digits."""
    j = np.arange(n, dtype=np.float64)
    log_ratio = np.log(n - j) - np.log(j + 1) + math.log(p) - math.log1p(-p)  # pmf(j + 1) / pmf(j)
    log_pmf = n * math.log1p(-p) + np.concatenate([[0.0], np.cumsum(log_ratio)])
    tails = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # tails[m] = sum of pmf[m:]
    return np.concatenate([np.minimum(tails, 1.0), [0.0]])


def order_statistic_rank(n: int, false_alarms: float, confidence: float) -> int | None:
    """How many of n good scores may lie at or above the threshold: the largest m such that the
    m-th highest score keeps the false-alarm rate at most `false_alarms` with probability at least
    `confidence`, or None when no m does (too few images).

    For i.i.d. good scores X_1..X_n, t = the m-th highest and the rule 'anomalous when score > t', a
    new good image is a false alarm with probability q = 1 - F(t). F(t) is at least (stochastically)
    the (n-m+1)-th order statistic of n uniforms, equal to it when F is continuous, so
    P(q <= a) >= P(at least m of the n uniforms are > 1 - a) = P(Binomial(n, a) >= m), for any F
    (ties included). Any m with that probability >= confidence gives the guarantee; the largest m
    gives the lowest threshold.
    """
    _check_target(false_alarms, confidence)
    if n < 1:
        return None
    tails = binomial_tails(n, false_alarms)
    eligible = np.flatnonzero(tails[1:] >= confidence)  # tails decrease in m: eligible = 1..m_max
    return int(eligible[-1]) + 1 if eligible.size else None


def images_needed(false_alarms: float, confidence: float) -> int:
    """The fewest good images for which a threshold with this guarantee exists: the highest score of
    n images qualifies once 1 - (1 - a)^n >= confidence (299 for 1 % at 95 %)."""
    _check_target(false_alarms, confidence)
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-false_alarms)))
    while 1 - (1 - false_alarms) ** n < confidence:  # the float log above may be a hair low or high
        n += 1
    while n > 1 and 1 - (1 - false_alarms) ** (n - 1) >= confidence:
        n -= 1
    return n


def lowest_target(n: int, confidence: float) -> float:
    """The lowest false-alarm rate n good images can vouch for at this confidence: 1 - (1 - c)^(1/n)."""
    return 1 - (1 - confidence) ** (1 / n)


class TooFewImages(PipelineError):
    """Fewer good images than the false-alarm target needs at the confidence asked."""


@dataclass(frozen=True)
class OrderStatistic:
    threshold: float  # the next float above `score`: `flagged` (score >= threshold) then means score > the statistic
    score: float  # the rank-th highest of the n scores (it and those below it are not flagged)
    rank: int
    n: int
    false_alarms: float
    confidence: float

    def describe(self, what: str = "good image scores") -> str:
        """'just above the 3rd highest of 400 good image scores: at most 1% false alarms with 95% confidence,
        distribution-free'"""
        which = "the highest" if self.rank == 1 else f"the {ordinal(self.rank)} highest"
        return (f"just above {which} of {self.n} {what}: at most {percent(self.false_alarms)} false alarms with "
                f"{percent(self.confidence)} confidence, distribution-free")


def order_statistic_threshold(scores, false_alarms: float, confidence: float,
                              what: str = "good images") -> OrderStatistic:
    """The threshold with the guarantee of `order_statistic_rank`; TooFewImages (one line, with the
    number the target needs and the lowest target these images allow) when there is none."""
    scores = _finite_scores(scores, f"{what}' scores")
    rank = order_statistic_rank(scores.size, false_alarms, confidence)
    if rank is None:
        raise TooFewImages(too_few_message(scores.size, false_alarms, confidence, what))
    statistic = float(np.sort(scores)[scores.size - rank])
    # strictly above it: with ties (identical frames) '>=' would flag every image at the statistic
    return OrderStatistic(float(np.nextafter(statistic, np.inf)), statistic, rank, int(scores.size),
                          float(false_alarms), float(confidence))


def too_few_message(n: int, false_alarms: float, confidence: float, what: str = "good images") -> str:
    lowest = f"; {n} can vouch for {percent(lowest_target(n, confidence), up=True)} at best" if n else ""
    return (f"{n} {what} are too few for at most {percent(false_alarms)} false alarms with "
            f"{percent(confidence)} confidence: that needs at least {images_needed(false_alarms, confidence)}{lowest}")


def validation_threshold(val_scores, settings: dict) -> tuple[float, str]:
    """evaluate's threshold of the validation (good) scores by `evaluate.threshold_rule`, and the rule in words."""
    rule = settings.get("threshold_rule", "mean_std")
    if rule == "mean_std":
        n_std = settings["threshold_n_std"]
        return (mean_std_threshold(val_scores, n_std),
                f"anomalous when score >= mean + {n_std} std of the validation (good) image scores")
    if rule != "quantile":
        raise PipelineError(f"evaluate.threshold_rule: unknown rule {rule!r} ({' or '.join(THRESHOLD_RULES)})")
    false_alarms, confidence = settings["threshold_false_alarms"], settings["threshold_confidence"]
    try:
        chosen = order_statistic_threshold(val_scores, false_alarms, confidence, "validation images")
    except TooFewImages as exc:
        raise PipelineError(
            f"evaluate.threshold_rule quantile: {exc} (raise evaluate.threshold_false_alarms, or hold out more "
            "good images: preprocess.val_fraction; or calibrate on your own: python -m stages.calibrate)"
        ) from None
    return chosen.threshold, f"anomalous when score >= {chosen.describe('validation (good) image scores')}"


def percent(value: float, up: bool = False) -> str:
    """0.01 -> '1%', 0.0123 -> '1.23%' (three significant digits); `up` rounds up, so a lowest
    achievable target is never understated."""
    shown = 100 * value
    decimals = max(0, 2 - math.floor(math.log10(shown))) if shown > 0 else 0
    if up:
        shown = math.ceil(shown * 10**decimals - 1e-9) / 10**decimals
    return f"{shown:.{decimals}f}".rstrip("0").rstrip(".") + "%" if decimals else f"{shown:.0f}%"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
