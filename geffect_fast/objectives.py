"""Unlearning objectives L_u, as the official G-effect code (tmlr-group/G-effect, ``dataloader.py``) computes
them (DESIGN.md §1).

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
``rmu``     L = (1/N') Σ_t (1/d) ‖h_t^(layer) − c·u‖² over the N' positions t whose next label is valid, with
            u ~ U[0,1)^d drawn once from ``seed`` (``distance="mse"``, the official code); ``distance="l1"``
            takes (1/d) Σ |h_t − c·u| instead (ours: the official code has it only in commented-out lines)
``idkpo``   L = R(idk batch): NLL of refusal answers to the forget questions
==========  =====================================================================================

Any objective also takes ``retain="gd"`` (adds λ·R(retain)) or ``retain="kl"`` (adds λ·KL(p_ref ‖ p_θ) on
the retain batch), λ = ``retain_weight``, with ``forget_weight`` scaling the forget term (open-unlearning's
alpha and gamma); those read the open-unlearning batch convention ``{"forget": batch, "retain": batch}``. A
plain batch is the forget batch. The KL term is, by default (``kl_positions="all"``), the official one,
``F.kl_div(log_softmax(logits).view(-1, V), log_softmax(ref_logits).view(-1, V), "batchmean", log_target=True)``:
the mean of KL(p_ref,t ‖ p_θ,t) over *all* B·T positions of the batch — prompt, padding and the last
position included, unshifted (the official batches are padded to ``max_length``, so it averages over that
padding too: :func:`geffect_fast.data.encode_qa` with ``padding="max_length"``). ``kl_positions="labelled"``
(ours) averages over the labelled, shifted positions only. Both are computed in float32 (float64 for float64
models).

Defaults — the official training code's (``dataloader.py``, ``CustomTrainerForgetting.compute_loss``, the
value used when ``hyper_param`` is ``None``):

=============  ==========================  ==========================================================
objective      default                     where it comes from
=============  ==========================  ==========================================================
``npo``        β = 0.5                     ``npo`` branch: ``else: self.beta=.5``
``wga``        α = 5                       ``wga`` branch: ``self.beta = 5`` (the exponent, named beta there)
``tnpo``       β = 4                       ``tnpo`` branch: ``else: self.beta=4``
``wtnpo``      β = 4, α = 1.5              ``wtnpo_<α>`` branch: β = 4; α parsed from the name, else 1.5
``rmu``        c = 2, ``distance="mse"``   ``rmu_<layer>`` branches: ``c=2``; ``((h[..., :-1, :] - c·u) ** 2)``
                                           ``.mean(-1)`` averaged over positions whose next label is valid
``rmu``        layer = −1 (the last)       ours: the official layer comes from the name, no default (its
                                           comments name 10, 21, 32 of Llama-2-7B's 33 hidden states)
``gd``         λ = 1                       ``gd`` branch: ``gd_coef = 1``
retain ``kl``  λ = 1, all positions        ``KL`` and every ``*_kl`` branch: ``loss += retain_loss``
``simnpo``     β = 4.5, δ = 0              ours: not in the official code (the paper does not study SimNPO)
``ga``         —                           no hyper-parameter
``idkpo``      —                           no hyper-parameter
=============  ==========================  ==========================================================

Quirks of the official code, documented rather than copied: its ``npo_kl`` branch sets β *and* the KL weight
to ``hyper_param`` (and fails without one), so NPO+KL here is NPO (β = 0.5) plus KL at λ = 1 as in every
other ``*_kl`` branch; the G-effect script (``dataloader_ge.py``, ``w_ins_npo``) sets WTNPO's β = α =
``hyper_param``; its RMU u is drawn unseeded, ``torch.rand(1, 1, 4096)``, and cut to the hidden size (ours is
seeded: the same distribution, not the same draw).

NPO's gradient is weighted GA on the summed NLL: ∇L_npo = −(1/B) Σ_b w_b ∇S_b with
w_b = 2 σ(−β (S_b − S_b^ref)) = 2 p_b^β / (p_b^β + (p_b^ref)^β); :meth:`Objective.weights` returns these
weights (per token for WGA/TNPO/WTNPO, per sequence for NPO and SimNPO) for analysis.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import IGNORE_INDEX, forward_logits, risk, token_nll

EPS = 1e-5  # the official code's constant in TNPO/WTNPO's denominators
KL_POSITIONS = ("all", "labelled")
RMU_DISTANCES = ("mse", "l1")


def forget_part(objective: Any) -> Any:
    """The objective without its retain term (itself where it has none): L_u's forget part, Σ_j ℓ^obj_j, which
    :meth:`Objective.per_sample` splits by forget sample."""
    if not getattr(objective, "retain", None):
        return objective
    part = copy.copy(objective)
    part.retain = None
    return part


def sample_losses(objective: Any, model: nn.Module, batch: Any, ref_model: nn.Module | None, B: int) -> Tensor:
    """``objective.per_sample(model, batch, ref_model)``, checked: shape [B] (one value per forget sample) and
    finite."""
    per = objective.per_sample(model, batch, ref_model)
    if per.shape != (B,):
        raise ValueError(f"objective {objective.name!r}: per_sample gave {tuple(per.shape)}, not [{B}]")
    if not bool(torch.isfinite(per.detach()).all()):
        raise ValueError(f"objective {objective.name!r} is not finite on the objective batch")
    return per


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
        self,
        name: str,
        retain: str | None = None,
        retain_weight: float = 1.0,
        forget_weight: float = 1.0,
        kl_positions: str = "all",
        **hp,
    ):
        unknown = set(hp) - set(self.defaults)
        if unknown:
            allowed = sorted({*self.defaults, "retain", "retain_weight", "forget_weight", "kl_positions"})
            raise TypeError(f"objective {name!r} has no hyperparameter(s) {sorted(unknown)}; allowed: {allowed}")
        if retain not in (None, "gd", "kl"):
            raise ValueError(f"retain must be None, 'gd' or 'kl', got {retain!r}")
        if kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions must be 'all' (the official code) or 'labelled', got {kl_positions!r}")
        self.name = name
        self.kl_positions = kl_positions
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
        if self.retain:
            loss = loss + self.retain_loss(model, batch, ref_model)
        return loss

    def retain_loss(self, model: nn.Module, batch: Any, ref_model: nn.Module | None = None) -> Tensor | float:
        """The retain regulariser alone, λ·NLL(retain) (``"gd"``) or λ·KL(p_ref ‖ p_θ) (``"kl"``); 0 without one.
        L_u = forget_weight·Σ_j ℓ^obj_j + retain_loss."""
        if not self.retain:
            return 0.0
        _, retain, _ = split_batch(batch)
        if retain is None:
            raise ValueError(
                f"objective {self.name!r} needs a retain batch: pass {{'forget': forget_batch, 'retain': retain_batch}}"
            )
        if self.retain == "gd":
            return self.retain_weight * risk(model, retain)
        if ref_model is None:
            raise ValueError(f"objective {self.name!r} with retain='kl' needs a reference model: pass ref_model=")
        return self.retain_weight * kl_to_reference(model, ref_model, retain, self.kl_positions)

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
        if self.retain == "kl" and self.kl_positions != "all":
            extra += f", kl_positions={self.kl_positions!r}"
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
    defaults = {"beta": 0.5}
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
    defaults = {"alpha": 5.0}

    def token_weights(self, nll, forget, ref_model):
        return torch.exp(-nll) ** self.hp["alpha"]


class TNPO(_WeightedGA):
    defaults = {"beta": 4.0}
    needs_ref = True

    def token_weights(self, nll, forget, ref_model):
        b = self.hp["beta"]
        p, p_ref = torch.exp(-nll), torch.exp(-_ref_nll(ref_model, forget))
        return 2 * p**b / (p**b + p_ref**b + EPS)


class WTNPO(_WeightedGA):
    defaults = {"beta": 4.0, "alpha": 1.5}
    needs_ref = True

    def token_weights(self, nll, forget, ref_model):
        b, a = self.hp["beta"], self.hp["alpha"]
        p, p_ref = torch.exp(-nll), torch.exp(-_ref_nll(ref_model, forget))
        return 2 * p ** (b + a) / (p**b + p_ref**b + EPS)


class RMU(Objective):
    defaults = {"layer": -1, "c": 2.0, "seed": 0, "distance": "mse"}

    def __init__(self, name: str, **kw):
        super().__init__(name, **kw)
        if self.hp["distance"] not in RMU_DISTANCES:
            raise ValueError(
                f"rmu distance must be 'mse' (the official code) or 'l1' (ours), got {self.hp['distance']!r}"
            )
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


def kl_to_reference(
    model: nn.Module, ref_model: nn.Module, batch: Mapping[str, Tensor], positions: str = "all"
) -> Tensor:
    """KL(p_ref ‖ p_θ) summed over the vocabulary and averaged over positions: ``"all"`` B·T positions of the
    batch, unshifted (the official code's ``kl_div(..., reduction="batchmean", log_target=True)`` on the
    flattened log-probabilities), or the ``"labelled"`` (shifted) ones. Float32, float64 for float64 logits."""
    if positions not in KL_POSITIONS:
        raise ValueError(f"positions must be 'all' or 'labelled', got {positions!r}")
    logits = forward_logits(model, batch)
    with torch.no_grad():
        ref = forward_logits(ref_model, batch)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if positions == "labelled":
        logits, ref = logits[:, :-1], ref[:, :-1]
    logq = F.log_softmax(logits.to(acc), -1)
    logp = F.log_softmax(ref.to(acc), -1)
    kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)  # [B, T]: Σ_v p_ref (log p_ref − log p_θ)
    if positions == "all":
        return kl.mean()
    return _pooled(kl, batch["labels"][:, 1:] != IGNORE_INDEX)


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
    """An objective by name (see the module docstring), e.g. ``get("npo", beta=0.5, retain="kl")``."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key](key, **hparams)


#: what the library takes as an objective: an :class:`Objective`, or any ``fn(model, batch, ref_model) -> loss``
ObjectiveFn = Callable[[nn.Module, Any, "nn.Module | None"], Tensor]


def objective_name(objective: ObjectiveFn, name: str | None = None) -> str:
    """``name``, or the objective's own ``name``/``__name__`` ("objective" for a lambda)."""
    if name is None:
        name = getattr(objective, "name", None) or getattr(objective, "__name__", None) or "objective"
        if name == "<lambda>":
            name = "objective"
    return name


def objective_loss(
    model: nn.Module, objective: ObjectiveFn, batch: Any, ref_model: nn.Module | None, name: str
) -> Tensor:
    """L_u = ``objective(model, batch, ref_model)``, checked: a finite scalar that requires grad (clear errors for
    a batch without the keys the objective looks up)."""
    try:
        loss = objective(model, batch, ref_model)
    except KeyError as e:  # a bare KeyError('labels') from deep inside an objective says too little
        key = e.args[0] if e.args else None
        raise KeyError(
            f"objective {name!r} looked up {key!r}, which its batch does not have ({_describe(batch)}); "
            "a batch needs input_ids and labels (−100 = ignored), and objectives with a retain term take "
            "{'forget': batch, 'retain': batch}"
        ) from e
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"objective {name!r} must return a scalar tensor, got {type(loss).__name__}")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"objective {name!r} is not finite ({loss.item()})")
    if not loss.requires_grad:
        raise ValueError(f"objective {name!r} does not depend on the model's trainable parameters")
    return loss


def _describe(batch: Any) -> str:
    """The keys of a batch, or of each part of an open-unlearning {'forget': ..., 'retain': ...} dict."""
    if not isinstance(batch, Mapping):
        return f"a {type(batch).__name__}"
    parts = [f"{k}: keys {', '.join(map(str, v))}" for k, v in batch.items() if isinstance(v, Mapping)]
    return "; ".join(parts) if parts else f"keys {', '.join(map(str, batch))}"


#: the retain regularisers a name may carry as a suffix: ``"npo+kl"`` is ``get("npo", retain="kl")``
RETAIN_SUFFIXES = ("kl", "gd")


def resolve(objective: Any, **hparams: Any) -> Any:
    """What every function that takes an objective calls first: a name becomes the built-in objective — ``"npo"``,
    ``"NPO"``, an alias (``"grad_ascent"``), or a name with its retain regulariser, ``"npo+kl"`` / ``"ga+gd"``
    (= ``get(name, retain=...)``), with ``hparams`` passed on; an :class:`Objective` or any callable
    ``(model, batch, ref_model) -> loss`` is returned as it is (``hparams`` then must be empty).

    >>> resolve("npo+kl")
    Objective('npo', {'beta': 0.5}, retain='kl', retain_weight=1.0)
    """
    if isinstance(objective, str):
        base, plus, suffix = objective.strip().partition("+")
        if plus:
            if suffix.strip().lower() not in RETAIN_SUFFIXES:
                raise KeyError(
                    f"unknown objective {objective!r}: a '+' suffix names the retain regulariser, "
                    f"one of {', '.join(RETAIN_SUFFIXES)} (e.g. 'npo+kl')"
                )
            if "retain" in hparams:
                raise TypeError(f"objective {objective!r} names its retain term; do not pass retain= as well")
            hparams = {**hparams, "retain": suffix.strip().lower()}
        return get(base.strip(), **hparams)
    if not callable(objective):
        raise TypeError(
            f"an objective is a name ({', '.join(REGISTRY)}; '+kl'/'+gd' adds a retain term) or a callable "
            f"(model, batch, ref_model) -> loss, got {type(objective).__name__}"
        )
    if hparams:
        raise TypeError(f"hyper-parameters {sorted(hparams)} apply to objectives given by name, not to {objective!r}")
    return objective
