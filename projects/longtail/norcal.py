"""NorCal (Pan et al., "On Model Calibration for Long-Tailed Object Detection and Instance
Segmentation", NeurIPS 2021): post-hoc calibration of a softmax detector's class scores, an
inference option of the long-tail box predictor (``TEST.CALIBRATION.*``, the official key names).

With ``N_c`` the number of training images containing class ``c`` (clamped at 1) and the
foreground weights ``a_c`` (``METHOD "gamma"``: ``N_c^-gamma``; ``"cb"``: the class-balanced
``(1 - beta) / (1 - beta^N_c)`` with ``beta = GAMMA``), the calibrated probabilities of logits
``z`` [N, C + 1] (background last) are, per ``WITH``:

* ``"exps"`` (the paper's method): ``P_c ∝ a_c exp(z_c)`` for ``c < C``, ``P_C ∝ exp(z_C)``,
  normalised over the row (``RENORM``); computed in log space, so large logits stay finite
  (the official ``exp`` overflows to NaN rows, which detectron2 then silently drops);
* ``"probs"``: ``a_c softmax(z)_c`` on the foreground, background untouched, then normalised
  (with ``RENORM`` identical to ``"exps"``);
* ``"logits"``: the foreground logits *multiplied* by ``a_c``, then softmax (``RENORM`` has no
  effect: a softmax is normalised).

``RENORM False`` with ``"exps"`` / ``"probs"`` returns the unnormalised products, as the official
code does. The background score is never re-weighted. ``GAMMA 0`` (the default) is no
calibration. Counts come from the *training* set's metadata (the official code picks LVIS v0.5 or
v1 counts from the test set's name; fixed). Training is untouched.
"""
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NorCal", "norcal_log_weights", "norcal_probabilities", "norcal_rescale",
           "METHODS", "MODES"]

METHODS = ("gamma", "cb")
MODES = ("exps", "probs", "logits")


def norcal_log_weights(image_counts, gamma: float, method: str = "gamma") -> torch.Tensor:
    """[C] ``log a_c`` (module docstring), counts clamped at 1."""
    n = torch.as_tensor(image_counts, dtype=torch.float64).clamp(min=1.0)
    if method == "gamma":
        return (-gamma * torch.log(n)).float()
    if method == "cb":
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"TEST.CALIBRATION.METHOD 'cb' needs 0 < GAMMA (beta) < 1, got {gamma}.")
        return (torch.log1p(torch.tensor(-gamma, dtype=torch.float64))
                - torch.log1p(-torch.pow(gamma, n))).float()
    raise ValueError(f"TEST.CALIBRATION.METHOD={method!r}; choose one of {METHODS}.")


def norcal_probabilities(logits: torch.Tensor, log_weights: torch.Tensor, mode: str = "exps",
                         renorm: bool = True) -> torch.Tensor:
    """
    Calibrated scores [N, C + 1] of softmax logits [N, C + 1] with foreground weights
    ``exp(log_weights)`` [C] (module docstring). The input is not modified.
    """
    z = logits.float()
    lw = log_weights.to(z)
    zero = lw.new_zeros(1)
    if mode in ("exps", "probs"):
        shifted = z + torch.cat([lw, zero])[None]
        if renorm:
            return F.softmax(shifted, dim=1)
        if mode == "exps":
            return torch.exp(shifted)
        return F.softmax(z, dim=1) * torch.exp(torch.cat([lw, zero]))[None]
    if mode == "logits":
        scaled = torch.cat([z[:, :-1] * torch.exp(lw)[None], z[:, -1:]], dim=1)
        return F.softmax(scaled, dim=1)
    raise ValueError(f"TEST.CALIBRATION.WITH={mode!r}; choose one of {MODES}.")


def norcal_rescale(probs: torch.Tensor, log_weights: torch.Tensor, renorm: bool = True
                   ) -> torch.Tensor:
    """
    The ``"probs"`` form applied to scores that are not a softmax of one logit vector (BAGS,
    Seesaw, sigmoid losses; the ``TEST.CALIBRATION.ALLOW_NON_SOFTMAX`` extension): foreground
    scores [N, C + 1] times ``a_c``, background untouched, then divided by the row sum when
    ``renorm``.
    """
    p = probs.float() * torch.exp(torch.cat([log_weights.to(probs.device).float(),
                                             log_weights.new_zeros(1, device=probs.device)]))[None]
    return p / p.sum(dim=1, keepdim=True).clamp(min=1e-12) if renorm else p


class NorCal(nn.Module):
    """The calibration of a predictor's softmax logits (module docstring); the weights are a
    non-persistent buffer (recomputed from the training counts, not saved)."""

    def __init__(self, image_counts: Sequence[int], gamma: float, method: str = "gamma",
                 mode: str = "exps", renorm: bool = True, softmax_logits: bool = True):
        """
        Args:
            image_counts: [C] training images per class.
            gamma, method, mode, renorm: ``TEST.CALIBRATION.{GAMMA, METHOD, WITH, RENORM}``.
            softmax_logits: False for a predictor whose scores are not a softmax of its logits:
                :meth:`forward` then takes its ``[N, C + 1]`` probabilities
                (:func:`norcal_rescale`).
        """
        super().__init__()
        self.softmax_logits = softmax_logits
        if mode not in MODES:
            raise ValueError(f"TEST.CALIBRATION.WITH={mode!r}; choose one of {MODES}.")
        self.gamma, self.method, self.mode, self.renorm = gamma, method, mode, renorm
        self.register_buffer("log_weights", norcal_log_weights(image_counts, gamma, method),
                             persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax logits (or, for ``softmax_logits=False``, probabilities) [N, C + 1] -> the
        calibrated [N, C + 1] scores."""
        if not self.softmax_logits:
            return norcal_rescale(logits, self.log_weights, self.renorm)
        return norcal_probabilities(logits, self.log_weights, self.mode, self.renorm)

    def extra_repr(self) -> str:
        return f"method={self.method}, gamma={self.gamma}, with={self.mode}, renorm={self.renorm}"
