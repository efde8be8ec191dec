"""Unlearning objectives L_u, exact to the official G-effect code's reductions (DESIGN.md §1).

Notation, per forget sample b with labelled (shifted) answer tokens t: nll_t = −log p_θ(y_t | y_<t, x),
p_t = exp(−nll_t), S_b = Σ_{t∈b} nll_t (summed), ℓ_b = S_b / n_b (mean), N = Σ_b n_b; "ref" quantities come
from the frozen reference model; weights written w are detached (no gradient flows through them).

==========  =====================================================================================
``ga``      L = −(1/N) Σ_t nll_t                               (gradient ascent; token mean pooled)
``gd``      L = L_ga(forget) + λ·R(retain)                     (gradient difference)
``npo``     L = −(2/β) (1/B) Σ_b log σ(β (S_b − S_b^ref))       (per-sequence *summed* NLL)
``simnpo``  L = −(2/β) (1/B) Σ_b log σ(β (ℓ_b − δ))             (reference-free, length-normalised)
``wga``     L = −(1/N) Σ_t w_t nll_t,  w_t = p_t^α
``tnpo``    L = −(1/N) Σ_t w_t nll_t,  w_t = 2 p_t^β / (p_t^β + (p_t^ref)^β + 1e-5)
``wtnpo``   L = −(1/N) Σ_t w_t nll_t,  w_t = 2 p_t^(β+α) / (p_t^β + (p_t^ref)^β + 1e-5)
``rmu``     L = mean over positions t whose next label is valid of d(h_t^(layer), c·u), with u ~ U[0,1)^d
            drawn once from ``seed`` and d the mean over the hidden dim of |·| (``distance="l1"``, as the
            official code) or of (·)² (``"mse"``, as the WMDP paper)
``idkpo``   L = R(idk batch): NLL of refusal answers to the forget questions
==========  =====================================================================================

Any objective also takes ``retain="gd"`` (adds λ·R(retain)) or ``retain="kl"`` (adds λ·KL(p_ref ‖ p_θ) on
the retain tokens, mean over labelled tokens), λ = ``retain_weight``, with ``forget_weight`` scaling the
forget term (open-unlearning's alpha and gamma); those read the open-unlearning batch convention
``{"forget": batch, "retain": batch}``. A plain batch is the forget batch.

NPO's gradient is weighted GA on the summed NLL: ∇L_npo = −(1/B) Σ_b w_b ∇S_b with
w_b = 2 σ(−β (S_b − S_b^ref)) = 2 p_b^β / (p_b^β + (p_b^ref)^β); :meth:`Objective.weights` returns these
weights (per token for WGA/TNPO/WTNPO, per sequence for NPO and SimNPO) for analysis.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import IGNORE_INDEX, forward_logits, risk, token_nll

EPS = 1e-5  # the official code's constant in TNPO/WTNPO's denominators


def split_batch(batch: Any) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor] | None, Mapping[str, Tensor] | None]:
    """(forget, retain, idk) from a plain forget batch or an open-unlearning dict."""
    if isinstance(batch, Mapping) and "forget" in batch:
        return batch["forget"], batch.get("retain"), batch.get("idk")
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch, None, None
    raise TypeError("an objective takes a batch (input_ids, labels, ...) or a dict {'forget': ..., 'retain': ...}")


class Objective:
    """An unlearning loss ``L_u(model, batch, ref_model) -> scalar`` (minimised)."""

    #: name -> default of this objective's own hyperparameters
    defaults: dict[str, Any] = {}
    needs_ref = False
    uses_retain = False

    def __init__(
        self, name: str, retain: str | None = None, retain_weight: float = 1.0, forget_weight: float = 1.0, **hp
    ):
        unknown = set(hp) - set(self.defaults)
        if unknown:
            allowed = sorted({*self.defaults, "retain", "retain_weight", "forget_weight"})
            raise TypeError(f"objective {name!r} has no hyperparameter(s) {sorted(unknown)}; allowed: {allowed}")
        if retain not in (None, "gd", "kl"):
            raise ValueError(f"retain must be None, 'gd' or 'kl', got {retain!r}")
        self.name = name
        self.hp = {**self.defaults, **hp}
        self.retain = retain
        self.retain_weight = float(retain_weight)
        self.forget_weight = float(forget_weight)

    # -- the loss ---------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: Any, ref_model: nn.Module | None = None) -> Tensor:
        forget, retain, idk = split_batch(batch)
        if self.needs_ref and ref_model is None:
            raise ValueError(f"objective {self.name!r} needs a reference model: pass ref_model=")
        if (self.retain or self.uses_retain) and retain is None:
            raise ValueError(
                f"objective {self.name!r} needs a retain batch: pass {{'forget': forget_batch, 'retain': retain_batch}}"
            )
        loss = self.forget_weight * self.forget_loss(model, forget, ref_model, idk=idk)
        if self.retain == "gd":
            loss = loss + self.retain_weight * risk(model, retain)
        elif self.retain == "kl":
            if ref_model is None:
                raise ValueError(f"objective {self.name!r} with retain='kl' needs a reference model: pass ref_model=")
            loss = loss + self.retain_weight * kl_to_reference(model, ref_model, retain)
        return loss

    def forget_loss(self, model, forget, ref_model, idk=None) -> Tensor:
        return self.forget_per_sample(model, forget, ref_model, idk=idk).sum()

    def forget_per_sample(self, model, forget, ref_model, idk=None) -> Tensor:
        """[B]: each forget sample's share ℓ^obj_j of the forget loss, L_forget = Σ_j ℓ^obj_j."""
        raise NotImplementedError

    def per_sample(self, model: nn.Module, batch: Any, ref_model: nn.Module | None = None) -> Tensor:
        """[B]: the objective split over its forget samples, L_u = Σ_j ℓ^obj_j (for pairwise G-effects:
        ∇L_u = Σ_j ∇ℓ^obj_j). Objectives with a retain term do not split over forget samples alone."""
        if self.retain or self.uses_retain:
            raise ValueError(
                f"objective {self.name!r} has a retain term: it does not split over its forget samples alone"
            )
        forget, _, idk = split_batch(batch)
        if self.needs_ref and ref_model is None:
            raise ValueError(f"objective {self.name!r} needs a reference model: pass ref_model=")
        return self.forget_weight * self.forget_per_sample(model, forget, ref_model, idk=idk)

    def weights(self, model: nn.Module, batch: Any, ref_model: nn.Module | None = None) -> Tensor | None:
        """The detached weights of this objective's weighted-GA form (see the module docstring), or None."""
        return None

    def __repr__(self) -> str:
        extra = f", retain={self.retain!r}, retain_weight={self.retain_weight}" if self.retain else ""
        return f"Objective({self.name!r}, {self.hp}{extra})"


def _nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    return token_nll(forward_logits(model, batch), batch["labels"])


def _ref_nll(ref_model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return _nll(ref_model, batch)[0]


def _pooled_rows(values: Tensor, mask: Tensor) -> Tensor:
    """Each sample's share of the token mean pooled over the batch: Σ_{t∈b} values_t / N, [B]."""
    n = mask.sum()
    if int(n) == 0:
        raise ValueError("the forget batch has no labelled tokens")
    return (values * mask).sum(1) / n


def _pooled(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean pooled over the batch: Σ over labelled tokens / N."""
    return _pooled_rows(values, mask).sum()


class GA(Objective):
    def forget_per_sample(self, model, forget, ref_model, idk=None):
        nll, mask = _nll(model, forget)
        return -_pooled_rows(nll, mask)


class GD(GA):
    """GA on the forget set plus λ·R(retain): ``gd`` is ``ga`` with ``retain="gd"``."""

    def __init__(self, name: str, retain: str | None = "gd", **kw):
        super().__init__(name, retain=retain or "gd", **kw)


class NPO(Objective):
    defaults = {"beta": 0.1}
    needs_ref = True

    def _log_ratio(self, model, forget, ref_model):
        nll, mask = _nll(model, forget)
        S = (nll * mask).sum(1)
        S_ref = (_ref_nll(ref_model, forget) * mask).sum(1)
        return S - S_ref  # = −log(π_θ(y|x) / π_ref(y|x))

    def forget_per_sample(self, model, forget, ref_model, idk=None):
        beta = self.hp["beta"]
        r = self._log_ratio(model, forget, ref_model)
        return -F.logsigmoid(beta * r) * 2 / beta / r.shape[0]

    def weights(self, model, batch, ref_model=None):
        if ref_model is None:
            raise ValueError("npo weights need the reference model")
        forget, _, _ = split_batch(batch)
        with torch.no_grad():
            return 2 * torch.sigmoid(-self.hp["beta"] * self._log_ratio(model, forget, ref_model))


class SimNPO(Objective):
    defaults = {"beta": 4.5, "delta": 0.0}

    def _margin(self, model, forget):
        nll, mask = _nll(model, forget)
        n = mask.sum(1)
        if bool((n == 0).any()):
            raise ValueError("simnpo: a forget sample has no labelled tokens")
        return (nll * mask).sum(1) / n - self.hp["delta"]

    def forget_per_sample(self, model, forget, ref_model, idk=None):
        beta = self.hp["beta"]
        m = self._margin(model, forget)
        return -F.logsigmoid(beta * m) * 2 / beta / m.shape[0]

    def weights(self, model, batch, ref_model=None):
        forget, _, _ = split_batch(batch)
        with torch.no_grad():
            return 2 * torch.sigmoid(-self.hp["beta"] * self._margin(model, forget))


class _WeightedGA(Objective):
    """L = −(1/N) Σ_t w_t nll_t with detached per-token weights w_t."""

    def token_weights(self, nll: Tensor, forget, ref_model) -> Tensor:
        raise NotImplementedError

    def forget_per_sample(self, model, forget, ref_model, idk=None):
        nll, mask = _nll(model, forget)
        w = self.token_weights(nll.detach(), forget, ref_model).detach()
        return -_pooled_rows(w * nll, mask)

    def weights(self, model, batch, ref_model=None):
        forget, _, _ = split_batch(batch)
        with torch.no_grad():
            nll, mask = _nll(model, forget)
            return self.token_weights(nll, forget, ref_model) * mask


class WGA(_WeightedGA):
    defaults = {"alpha": 1.0}

    def token_weights(self, nll, forget, ref_model):
        return torch.exp(-nll) ** self.hp["alpha"]


class TNPO(_WeightedGA):
    defaults = {"beta": 0.1}
    needs_ref = True

    def token_weights(self, nll, forget, ref_model):
        b = self.hp["beta"]
        p, p_ref = torch.exp(-nll), torch.exp(-_ref_nll(ref_model, forget))
        return 2 * p**b / (p**b + p_ref**b + EPS)


class WTNPO(_WeightedGA):
    defaults = {"beta": 0.1, "alpha": 1.0}
    needs_ref = True

    def token_weights(self, nll, forget, ref_model):
        b, a = self.hp["beta"], self.hp["alpha"]
        p, p_ref = torch.exp(-nll), torch.exp(-_ref_nll(ref_model, forget))
        return 2 * p ** (b + a) / (p**b + p_ref**b + EPS)


class RMU(Objective):
    defaults = {"layer": -1, "c": 6.5, "seed": 0, "distance": "l1"}

    def __init__(self, name: str, **kw):
        super().__init__(name, **kw)
        if self.hp["distance"] not in ("l1", "mse"):
            raise ValueError(f"rmu distance must be 'l1' or 'mse', got {self.hp['distance']!r}")
        self._u: dict[int, Tensor] = {}

    def target(self, d: int, device, dtype) -> Tensor:
        """c·u with u ~ U[0,1)^d drawn once per hidden size from ``seed``."""
        if d not in self._u:
            self._u[d] = torch.rand(d, generator=torch.Generator().manual_seed(int(self.hp["seed"])))
        return self._u[d].to(device=device, dtype=dtype) * self.hp["c"]

    def forget_per_sample(self, model, forget, ref_model, idk=None):
        kwargs = {k: forget[k] for k in ("attention_mask", "position_ids") if forget.get(k) is not None}
        out = model(input_ids=forget["input_ids"], output_hidden_states=True, use_cache=False, **kwargs)
        hs = out.hidden_states
        layer = int(self.hp["layer"])
        if not -len(hs) <= layer < len(hs):
            raise ValueError(f"rmu layer {layer} is outside the model's {len(hs)} hidden states")
        h = hs[layer][:, :-1]
        diff = h - self.target(h.shape[-1], h.device, h.dtype)
        dist = diff.abs().mean(-1) if self.hp["distance"] == "l1" else diff.pow(2).mean(-1)
        mask = forget["labels"][:, 1:] != IGNORE_INDEX
        return _pooled_rows(dist if dist.dtype == torch.float64 else dist.float(), mask)


class IdkPO(Objective):
    """NLL of refusal answers ("I don't know") to the forget questions. Takes ``{"forget": ..., "idk": ...}``
    (the idk batch holds the refusals) or, as a plain batch, the refusal batch itself."""

    def forget_per_sample(self, model, forget, ref_model, idk=None):
        nll, mask = _nll(model, idk if idk is not None else forget)
        return _pooled_rows(nll, mask)


def kl_to_reference(model: nn.Module, ref_model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """KL(p_ref ‖ p_θ) summed over the vocabulary, averaged over the labelled (shifted) positions."""
    logits = forward_logits(model, batch)[:, :-1].float()
    with torch.no_grad():
        ref = forward_logits(ref_model, batch)[:, :-1].float()
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    logp, logq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return _pooled(kl, mask)


REGISTRY: dict[str, type[Objective]] = {
    "ga": GA,
    "gd": GD,
    "npo": NPO,
    "simnpo": SimNPO,
    "wga": WGA,
    "tnpo": TNPO,
    "wtnpo": WTNPO,
    "rmu": RMU,
    "idkpo": IdkPO,
}
ALIASES = {"idk": "idkpo", "ins_npo": "tnpo", "w_ins_npo": "wtnpo", "grad_ascent": "ga", "grad_diff": "gd"}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str, **hparams: Any) -> Objective:
    """An objective by name (see the module docstring), e.g. ``get("npo", beta=0.1, retain="kl")``."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key](key, **hparams)
