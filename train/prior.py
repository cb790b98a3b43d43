"""The prior correction: the logit offset that gives the saved model the data's class odds back."""

from __future__ import annotations

import math

import torch
from torch import nn

from xr.core.config import Recipe


def prior_correction(cfg: Recipe, labels: list[int]) -> float:
    """Logit offset that turns the training objective's posterior back into the data's.

    A class-balanced sampler trains the model as if PNEUMONIA had odds 1:1, and pos_weight w multiplies
    the odds it learns by w; on this data the true odds are ~2.9:1. A single temperature cannot undo such
    a shift (it only scales), so the offset log(true odds) - log(trained odds) is added to the classifier
    bias of the saved model (logit adjustment, Menon et al. 2021); docs/benchmarks.md has its effect.
    """
    n_pos = max(1, sum(labels))
    n_neg = max(1, len(labels) - n_pos)
    true_log_odds = math.log(n_pos / n_neg)
    trained_log_odds = 0.0 if cfg.train.weighted_sampler else true_log_odds
    if cfg.train.pos_weight:
        trained_log_odds += math.log(n_neg / n_pos)
    return true_log_odds - trained_log_odds


class BiasShift:
    """Temporarily add ``shift`` to the classifier bias (to save the prior-corrected model)."""

    def __init__(self, model: nn.Module, shift: float):
        self.bias, self.shift = model.get_classifier().bias, shift

    def __enter__(self):
        self.saved = self.bias.detach().clone()
        with torch.no_grad():
            self.bias += self.shift

    def __exit__(self, *exc):
        with torch.no_grad():
            self.bias.copy_(self.saved)
