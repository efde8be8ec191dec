"""Kronecker-projected per-sample gradient sketches (LoGra-style) for G-effects at scale.

For a parameter whose per-sample gradient is G_b = Σ_{t∈b} L_t R_tᵀ (d_L × d_R), the sketch is

    S_b = P_L G_b P_Rᵀ = Σ_{t∈b} (P_L L_t)(P_R R_t)ᵀ        (k_L × k_R, formed without G_b)

with P_L, P_R Gaussian, entries N(0, 1/k), drawn from a seed per parameter and side. Since E[PᵀP] = I and
the two sides are independent, E⟨S_b, S'_c⟩ = ⟨G_b, G'_c⟩: dot products of sketches are unbiased
estimates of pairwise G-effects, with relative error falling like 1/√k (Johnson–Lindenstrauss). Vector
parameters (norm weights, biases: d_R = 1) are sketched on one side only. A direction V is sketched the same
way, P_L V P_Rᵀ, so ⟨S_b, S_V⟩ estimates the per-instance G-effect ⟨G_b, V⟩.

Sketches are stored as safetensors with the seed, k, the parameter list and a fingerprint of the model's
parameter names and shapes; combining sketches made with another seed, k or model is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from . import groups as groups_mod
from .capture import UnsupportedModuleError
from .directions import Direction
from .distributed import refuse_sharded
from .engine import (
    Projector,
    backward,
    check_packing,
    forward,
    module_map,
    opened,
    plan_taps,
    start_batch,
    uncovered_reasons,
    unwrap,
)
from .loss import check_batch, packed_samples, sample_nll
from .ops import resolve
from .pairwise import trainable_or_raise


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's parameter names and shapes (not values)."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


@dataclass
class Sketch:
    """Sketches of B samples (or K directions): ``tensors[param]`` [B, k_L, k_R] (float32)."""

    tensors: dict[str, Tensor]
    seed: int
    k: int
    model: str  #: fingerprint
    groups: dict[str, str]  #: param -> group

    @property
    def n(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {
            "seed": str(self.seed),
            "k": str(self.k),
            "model": self.model,
            "groups": json.dumps(self.groups),
            "params": json.dumps(list(self.tensors)),
        }
        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Sketch:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if not {"seed", "k", "model", "groups", "params"} <= set(meta):
                    raise ValueError(f"{path} is not a geffect_fast sketch (metadata {sorted(meta)})")
                tensors = {n: f.get_tensor(n) for n in json.loads(meta["params"])}
        except ValueError:
            raise
        except Exception as e:  # safetensors' own error types
            raise ValueError(f"{path} is not a readable sketch file: {e}") from None
        return cls(tensors, int(meta["seed"]), int(meta["k"]), meta["model"], json.loads(meta["groups"]))

    def _check(self, other: Sketch) -> None:
        for attr in ("seed", "k", "model"):
            if getattr(self, attr) != getattr(other, attr):
                raise ValueError(
                    f"sketches differ in {attr} ({getattr(self, attr)!r} vs {getattr(other, attr)!r}): their dot "
                    "products estimate nothing; sketch both with the same Sketcher"
                )
        if set(self.tensors) != set(other.tensors):
            raise ValueError("sketches cover different parameters")

    def dot(self, other: Sketch) -> dict[str, Tensor]:
        """Estimated pairwise G-effects per group: {group: [n_self, n_other]} (float64)."""
        self._check(other)
        out: dict[str, Tensor] = {}
        for name, s in self.tensors.items():
            g = self.groups[name]
            e = s.flatten(1).double() @ other.tensors[name].flatten(1).double().T
            out[g] = out[g] + e if g in out else e
        return out


class Sketcher:
    """Sketch per-sample gradients of every trainable parameter of ``model`` with k × k Kronecker projections
    (k per side; vector parameters get one side of k)."""

    def __init__(
        self, model: nn.Module, k: int = 64, seed: int = 0, groups: groups_mod.GroupSpec = "block",
        backend: str = "auto",
    ):  # fmt: skip
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.model = unwrap(model)
        refuse_sharded(self.model, "Sketcher")
        self.k = int(k)
        self.seed = int(seed)
        self.fingerprint = fingerprint(self.model)
        mm = module_map(self.model)
        # (d_L, d_R) per parameter, once: the sketch asks for them for every layer of every batch
        self._shapes = {n: (p.shape[0], 1) if p.dim() == 1 else (p.shape[0], p[0].numel()) for n, p in mm.named.items()}
        grouping = mm.grouping(groups)
        self.group_of = {n: grouping.names[grouping.of[n]] for n in mm.names}
        self._grouping = grouping
        self._names = trainable_or_raise(mm, "sketch")
        uncovered = uncovered_reasons(mm, self._names)
        if uncovered:
            n, why = next(iter(uncovered.items()))
            raise UnsupportedModuleError(f"sketching needs every trainable parameter covered: {n}: {why}")
        self._proj: dict[tuple[str, str], Tensor] = {}
        self.backend = backend

    def projection(self, name: str, side: str, d: int, device) -> Tensor:
        """P for parameter ``name``'s side ("L" or "R") of width d: [k, d], entries N(0, 1/k); [1, 1] = 1 when
        d == 1 (vector parameters are not projected on that side)."""
        key = (name, side)
        if key not in self._proj:
            if d == 1:
                p = torch.ones(1, 1)
            else:
                h = int(hashlib.sha256(f"{self.seed}:{name}:{side}".encode()).hexdigest()[:15], 16)
                p = torch.randn(self.k, d, generator=torch.Generator().manual_seed(h)) / self.k**0.5
            self._proj[key] = p
        return self._proj[key].to(device)

    def _shape(self, name: str) -> tuple[int, int]:
        """(d_L, d_R) of parameter ``name``'s per-sample gradient (d_R = 1 for vectors)."""
        return self._shapes[name]

    def sketch(self, batch: Mapping[str, Tensor], mode: str = "eval") -> Sketch:
        """Sketches of each sample's gradient of its mean token NLL ℓ_b."""
        model = self.model
        mm = module_map(model)
        check_batch(batch, "sketch batch", mm.device)
        packed = packed_samples(batch)
        if packed is not None:
            check_packing(mm, model, batch, packed)
            packed = packed.to(mm.device)
        B = batch["input_ids"].shape[0] if packed is None else int(packed[-1, -1]) + 1
        seg_outer = resolve(self.backend, mm.device, mm.act_dtype).segment_outer
        proj = Projector(self._shape, self.projection, seg_outer)
        plan = plan_taps(mm, dict.fromkeys(self._names, proj), self._grouping)
        with opened(mm, plan, mode) as session:
            start_batch(model, session, batch, packed)
            ell, n = sample_nll(forward(model, session, batch), batch["labels"], packed)
            backward((ell * (n > 0)).sum(), mm.device.type)
            session.check_outside_uses()
        out = proj.out
        tensors = {n: (out[n] if n in out else self._zero(n, B)).float().cpu() for n in sorted(self._trainable())}
        return Sketch(tensors, self.seed, self.k, self.fingerprint, {n: self.group_of[n] for n in tensors})

    def _trainable(self) -> set[str]:
        return set(self._names)

    def _zero(self, name: str, B: int) -> Tensor:
        dL, dR = self._shape(name)
        return torch.zeros(B, self.k if dL > 1 else 1, self.k if dR > 1 else 1)

    def sketch_direction(self, direction: Direction) -> Sketch:
        """P_L V_k P_Rᵀ for each of the K directions: [K, k_L, k_R] per parameter."""
        tensors = {}
        for name in sorted(self._trainable()):
            dL, dR = self._shape(name)
            if name in direction.keys():
                v = direction.tensor(name).double().reshape(direction.k, dL, dR)
                pl = self.projection(name, "L", dL, v.device).double()
                pr = self.projection(name, "R", dR, v.device).double()
                tensors[name] = (pl @ v @ pr.T).float().cpu()
            else:
                tensors[name] = self._zero(name, direction.k)
        return Sketch(tensors, self.seed, self.k, self.fingerprint, {n: self.group_of[n] for n in tensors})

    def check(self, sketch: Sketch) -> None:
        """Raise unless ``sketch`` was made by a sketcher like this one (same seed, k, model)."""
        probe = Sketch(
            {n: t[:0] for n, t in sketch.tensors.items()}, self.seed, self.k, self.fingerprint, sketch.groups
        )
        probe._check(sketch)
