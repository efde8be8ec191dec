"""The methods the suite compares. Each computes the same numbers — per-instance, per-group G-effects
e[b, g] = ⟨∇ℓ_b, V_g⟩ of one fixed direction V on one risk batch — or, for the floor, just runs one plain
forward+backward. Peers are used through their public APIs, never copied.

A method is ``prepare(model, batch, V, grouping) -> run`` where ``run()`` returns a float64 [B, G] tensor
(or None for the floor). A method that cannot run on a case raises :class:`Unsupported` with the reason.

Kronfluence tracks ``nn.Linear`` modules only: its numbers are compared on the linear layers' share of the
G-effect (``linear_only``), which the harness also computes with ours on the same case.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Callable

import torch
from torch import Tensor

import geffect_fast as gf
from geffect_fast.groups import Grouping
from geffect_fast.loss import forward_logits, sample_nll


class Unsupported(RuntimeError):
    """This method cannot compute this case; the message says why."""


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _dots(grads, names, V, grouping, B_index: int, out: Tensor) -> None:
    for n, g in zip(names, grads):
        if g is not None:
            out[B_index, grouping.of[n]] += float((g.double() * V[n].double()).sum())


# -- ours and the reference points --------------------------------------------------------------------------
def ours(backend: str) -> Callable:
    def prepare(model, batch, V, grouping):
        why = gf.backends(batch["input_ids"].device)[backend]["reason"] if backend != "auto" else ""
        if why:
            raise Unsupported(why)
        d = gf.Direction(V, "v")

        def run():
            return gf.measure(model, d, {"r": batch}, per_instance=True, backend=backend).per_instance["r"]

        return run

    return prepare


def plain_fwd_bwd(model, batch, V, grouping):
    """The floor: one ordinary forward+backward of the batch (weight gradients on). Not a G-effect."""

    def run():
        gf.risk(model, batch).backward()
        for p in model.parameters():
            p.grad = None

    return run


def per_sample_loop(model, batch, V, grouping):
    """One forward+backward per sample (weight gradients), dotted with V per group."""
    names = _names(model)
    params = dict(model.named_parameters())
    B = batch["input_ids"].shape[0]

    def run():
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for b in range(B):
            sub = {k: t[b : b + 1] for k, t in batch.items()}
            ell, _ = sample_nll(forward_logits(model, sub), sub["labels"])
            _dots(torch.autograd.grad(ell.sum(), [params[n] for n in names]), names, V, grouping, b, out)
        return out

    return run


def official_protocol(model, batch, V, grouping):
    """The official G-effect code's way, per instance: a backward per (micro-batch of one) sample, the full
    gradient copied to host memory, then the dot products there. (The official code runs three such backward
    passes per micro-batch — risk on forget, objective, risk on retain; here the objective's gradient V is
    given, so one per risk sample is counted, as ours gets V for free too.)"""
    names = _names(model)
    params = dict(model.named_parameters())
    B = batch["input_ids"].shape[0]
    V_host = {n: t.detach().to("cpu", copy=True).double().numpy() for n, t in V.items()}

    def run():
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for b in range(B):
            sub = {k: t[b : b + 1] for k, t in batch.items()}
            ell, _ = sample_nll(forward_logits(model, sub), sub["labels"])
            grads = torch.autograd.grad(ell.sum(), [params[n] for n in names])
            host = [g.detach().to("cpu", copy=True).double().numpy() for g in grads]  # the host copy
            for n, g in zip(names, host):
                out[b, grouping.of[n]] += float((g * V_host[n]).sum())
        return out

    return run


def torch_func_vmap(model, batch, V, grouping):
    """torch.func: vmap(grad) over the batch — per-sample gradients materialised [B, |θ|], then dotted."""
    from torch.func import functional_call, grad, vmap

    names = _names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    B, T = batch["input_ids"].shape
    if not bool((batch["attention_mask"].cumprod(1) == batch["attention_mask"]).all()):
        raise Unsupported("left padding: the explicit causal mask below assumes right padding")
    # an explicit additive causal mask [1, 1, T, T]: HF's own mask construction checks tensor values (data-dependent
    # control flow, which vmap rejects). With right padding no real token attends to a pad, so the loss is the same.
    p0 = next(model.parameters())
    causal = torch.full((1, 1, T, T), float("-inf"), dtype=p0.dtype, device=p0.device).triu(1)

    def loss_one(p, ids, labels):
        out = functional_call(model, p, (), {"input_ids": ids[None], "attention_mask": causal, "use_cache": False})
        return sample_nll(out.logits, labels[None])[0].sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def run():
        gs = per_sample(params, batch["input_ids"], batch["labels"])
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for n in names:
            out[:, grouping.of[n]] += (gs[n].double() * V[n].double()[None]).flatten(1).sum(1)
        return out

    return run


def opacus(model, batch, V, grouping):
    """Opacus GradSampleModule: per-sample gradients materialised in ``p.grad_sample``, then dotted."""
    if importlib.util.find_spec("opacus") is None:
        raise Unsupported("opacus is not installed (pip install opacus)")
    from opacus import GradSampleModule

    names = _names(model)
    params = dict(model.named_parameters())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    B = batch["input_ids"].shape[0]

    def run():
        gsm.train()  # Opacus records activations in training mode only (the configs have no dropout)
        try:
            ell, _ = sample_nll(forward_logits(gsm, batch), batch["labels"])
            ell.sum().backward()
            out = torch.zeros(B, len(grouping), dtype=torch.float64)
            for n in names:
                gsam = params[n].grad_sample
                out[:, grouping.of[n]] += (gsam.double() * V[n].double()[None]).flatten(1).sum(1)
            return out
        finally:
            gsm.zero_grad(set_to_none=True)
            model.eval()

    return run


def backpack(model, batch, V, grouping):
    """BackPACK BatchGrad: per-sample gradients materialised in ``p.grad_batch``, then dotted."""
    if importlib.util.find_spec("backpack") is None:
        raise Unsupported(
            "backpack-for-pytorch is not installed (pip install --no-deps backpack-for-pytorch unfoldNd einops: its "
            "torchvision requirement pulls a CUDA torch)"
        )
    from backpack import backpack as bp
    from backpack import extend
    from backpack.extensions import BatchGrad

    try:
        ext = extend(model)
    except Exception as e:  # noqa: BLE001 - report whatever BackPACK says
        raise Unsupported(f"BackPACK cannot extend this model: {type(e).__name__}: {str(e)[:150]}") from None
    names = _names(ext)
    params = dict(ext.named_parameters())
    B = batch["input_ids"].shape[0]

    def run():
        ell, _ = sample_nll(forward_logits(ext, batch), batch["labels"])
        with bp(BatchGrad()):
            ell.sum().backward()
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for n in names:
            gb = getattr(params[n], "grad_batch", None)
            if gb is None:
                raise Unsupported(f"BackPACK gives no per-sample gradient for {n} (its module type is not supported)")
            out[:, grouping.of[n]] += (gb.double() * V[n].double()[None]).flatten(1).sum(1)
        ext.zero_grad(set_to_none=True)
        return out

    return run


def kronfluence(model, batch, V, grouping, query=None):
    """Kronfluence, identity strategy, per-module pairwise scores ⟨∇m(query), ∇ℓ_b⟩ summed over the query
    examples — the G-effect of V = ∇ Σ_q ℓ_q, on its tracked modules (``nn.Linear`` only)."""
    if importlib.util.find_spec("kronfluence") is None:
        raise Unsupported("kronfluence is not installed (pip install --no-deps kronfluence einconv)")
    if query is None:
        raise Unsupported("needs the query batch that defines V")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class GTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return sample_nll(forward_logits(model, batch), batch["labels"])[0].sum()

        def compute_measurement(self, batch, model):
            return sample_nll(forward_logits(model, batch), batch["labels"])[0].sum()

    class Rows(torch.utils.data.Dataset):
        def __init__(self, b):
            self.b = b

        def __len__(self):
            return self.b["input_ids"].shape[0]

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.b.items()}

    pname = {id(p): n for n, p in model.named_parameters()}
    weight_of = {n: pname[id(m.weight)] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = prepare_model(model, GTask())
    tmp = tempfile.mkdtemp(prefix="kf")
    analyzer = Analyzer("g", wrapped, GTask(), output_dir=tmp, disable_tqdm=True, cpu=True, disable_model_save=True)
    fargs = FactorArguments(strategy="identity")
    B = batch["input_ids"].shape[0]

    def run():
        analyzer.fit_all_factors(
            "f",
            dataset=Rows(query),
            factor_args=fargs,
            per_device_batch_size=len(Rows(query)),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            "s",
            "f",
            query_dataset=Rows(query),
            train_dataset=Rows(batch),
            per_device_query_batch_size=len(Rows(query)),
            per_device_train_batch_size=B,
            score_args=ScoreArguments(compute_per_module_scores=True),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for mod, sc in scores.items():
            if mod not in weight_of:
                raise Unsupported(f"kronfluence scored a module it was not expected to track: {mod}")
            out[:, grouping.of[weight_of[mod]]] += sc.double().sum(0)
        return out

    return run


METHODS: dict[str, Callable] = {
    "ours[auto]": ours("auto"),
    "ours[reference]": ours("reference"),
    "ours[native]": ours("native"),
    "ours[cuda]": ours("cuda"),
    "ours[triton]": ours("triton"),
    "plain_fwd_bwd": plain_fwd_bwd,
    "per_sample_loop": per_sample_loop,
    "official_protocol": official_protocol,
    "torch.func_vmap": torch_func_vmap,
    "opacus": opacus,
    "backpack": backpack,
    "kronfluence": kronfluence,
}


def bergson_reason() -> str:
    if importlib.util.find_spec("bergson") is None:
        return (
            "bergson is not installed: it requires torchvision and torchaudio, which on this machine pull a CUDA "
            "build of torch over the CPU one"
        )
    return "bergson installed but not wired into this harness yet"


def restrict_to_linear(model, V: dict[str, Tensor]) -> dict[str, Tensor]:
    """V with every entry outside ``nn.Linear`` weights zeroed (the modules Kronfluence tracks)."""
    pname = {id(p): n for n, p in model.named_parameters()}
    keep = {pname[id(m.weight)] for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return {n: (t if n in keep else torch.zeros_like(t)) for n, t in V.items()}


def group_of(model) -> Grouping:
    from geffect_fast.groups import assign

    return assign(model, "block", _names(model))
