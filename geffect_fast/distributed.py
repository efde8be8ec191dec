"""Measuring across ranks with ``torch.distributed``: DDP replicas and FSDP2 (``fully_shard``) shards.

Each rank measures its own risk batches; the result every rank gets back is the single-process result over
the union of the batches (rank order), because everything the union needs is a sum over ranks:

* the reduction weights of the union, c_b = n_b / N (``token_mean``, N = Σ over all ranks) or 1/B'
  (``sample_mean``), known before the forward from the labels and one gather of per-rank pool sizes;
* per-instance values e_b = ⟨∇ℓ_b, v⟩, which are local to the rank that holds sample b — gathered;
* totals Σ_b c_b e_b and the risk Σ_b c_b ℓ_b — each rank's part, summed.

Two strategies (``Result.meta["strategy"]``):

``"taps"`` (DDP, plain replicas, and FSDP2 with ``per_instance=True``): the single-process pass on each
rank's batch. Under FSDP2 each tapped layer's direction is all-gathered inside its backward hook, used and
freed, as FSDP all-gathers parameters, with the next module's gather started ahead (asynchronously,
``CaptureSession.direction``): at most two modules' directions are alive; communication |v|·(W−1)/W bytes
per rank per risk set.

``"sharded"`` (FSDP2, aggregates only): an ordinary backward of Σ_{b∈rank} c_b ℓ_b with the direction's
parameters trainable; FSDP's reduce-scatter (a mean over the W ranks) leaves each rank its shard of
∇R(union)/W, which is dotted with the matching shard of v, scaled by W and summed per group; then one
gather of [K, G] scalars. No full gradient and no full direction exist anywhere.

Failure protocol: every rank passes the same *agreement points* (after checking the inputs, after each
risk set; under FSDP also after each forward, before FSDP's backward collectives), where ranks exchange a
status (ok, or the error text) and a fingerprint of the call (risk names, directions, groups, options).
A rank that fails tells the others and raises its own error; the others raise :class:`DistributedError`
naming it. A rank that never arrives (crashed, stuck, or not calling) makes the others raise after
``timeout`` seconds. Collectives *inside* an FSDP forward or
backward are FSDP's own and bounded by the process group's timeout.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .loss import pool_size

_MSG = 480  #: bytes of error text carried by an agreement point

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
else:  # pragma: no cover - builds without torch.distributed
    dist = None
    DTensor = ()  # type: ignore[assignment]


class DistributedError(RuntimeError):
    """Another rank failed, disagreed about the call, or did not answer in time."""


def is_dtensor(t: Any) -> bool:
    return dist is not None and isinstance(t, DTensor)


def gather_async(t: Tensor) -> Tensor:
    """Start all-gathering a sharded DTensor; the result waits on first use (or ``.wait()``)."""
    return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim, async_op=True).to_local()


def local_part(t: Tensor) -> Tensor:
    """This rank's local data of a DTensor, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module inside DDP / DataParallel / ``torch.compile`` wrappers, outermost first."""
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return


def sharded_mesh(model: nn.Module):
    """The device mesh of the model's DTensor parameters (FSDP2), or None when none is sharded."""
    if dist is None:  # pragma: no cover
        return None
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("the model's parameters are sharded over several device meshes; one 1-D mesh is supported")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(
            f"the model is sharded over a {mesh.ndim}-D device mesh (HSDP or tensor parallel); only 1-D FSDP2 "
            "meshes are supported"
        )
    for p in model.parameters():
        if isinstance(p, DTensor) and any(not isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(f"parameter placements {p.placements} are not supported; FSDP2's Shard(d) is")
    return mesh


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise for an FSDP2-sharded model in a single-rank feature."""
    if sharded_mesh(model) is not None:
        raise NotImplementedError(
            f"{what} runs on one rank and needs whole parameters; this model is FSDP2-sharded. Measure per-instance "
            "G-effects with geffect_fast.measure(..., per_instance=True), which supports FSDP2"
        )


_UNKNOWN = object()


def resolve_group(model: nn.Module, process_group: Any, mesh: Any = _UNKNOWN):
    """The process group a measurement spans.

    ``"auto"``: a DDP wrapper's group, or a 1-D FSDP2 mesh's group; None when the model is neither (or
    torch.distributed is not initialised). A ProcessGroup: that group. None: measure locally (refused for a
    sharded model, which cannot be measured by one rank alone). ``mesh``: the model's :func:`sharded_mesh` where
    the caller knows it already.
    """
    if mesh is _UNKNOWN:
        mesh = sharded_mesh(model)
    if process_group is None:
        if mesh is not None:
            raise ValueError(
                "the model is sharded (FSDP2): its G-effects need the whole group; pass process_group='auto' "
                "(the default) or the mesh's group"
            )
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got {process_group!r}")
        if dist is None or not dist.is_initialized():
            return None
        for m in wrappers(model):
            if isinstance(m, nn.parallel.DistributedDataParallel):
                return m.process_group
        return None if mesh is None else mesh.get_group()
    if dist is None or not dist.is_initialized():
        raise ValueError("a process group was given but torch.distributed is not initialised")
    return process_group


def fingerprint(*parts: Any) -> int:
    """A 31-bit checksum of the call's shape, compared across ranks."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


@dataclass
class Agreement:
    check: int = 0  #: fingerprint of the call, compared across ranks


class Comm:
    """The collectives of one measurement over ``group``, each bounded by ``timeout`` seconds."""

    def __init__(self, group, timeout: float):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = dist.get_backend(group)
        nccl = "nccl" in str(backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.timeout = float(timeout)

    def all_gather(self, t: Tensor, what: str) -> Tensor:
        """[W, *t.shape]: every rank's ``t`` (same shape and dtype on every rank), on the CPU."""
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        work = dist.all_gather(out, t, group=self.group, async_op=True)
        self._wait(work, what)
        return torch.stack(out).cpu()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise DistributedError(
                f"not every rank of the group answered within {self.timeout:g} s while {what} (a rank crashed, "
                "is stuck, or is not calling the same function)"
            ) from e

    def agree(self, phase: str, error: BaseException | None = None, check: int = 0) -> None:
        """An agreement point: exchange status and fingerprint; raise if another rank failed or differs."""
        text = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MSG]
        head = torch.zeros(3 + _MSG, dtype=torch.int64)
        head[0] = int(error is not None)
        head[1] = check
        head[2] = len(text)
        if text:
            head[3 : 3 + len(text)] = torch.tensor(list(text), dtype=torch.int64)
        got = self.all_gather(head, phase)
        if error is not None:
            return  # the caller re-raises its own error
        failed = [r for r in range(self.world) if int(got[r, 0])]
        if failed:
            r = failed[0]
            msg = bytes(got[r, 3 : 3 + int(got[r, 2])].tolist()).decode(errors="replace")
            others = f" (and rank(s) {failed[1:]})" if len(failed) > 1 else ""
            raise DistributedError(f"rank {r} failed while {phase}: {msg}{others}")
        checks = got[:, 1].tolist()
        if len(set(checks)) > 1:
            raise DistributedError(
                f"the ranks called with different risk sets, directions, groups or options (while {phase}: "
                f"checksums {checks}); every rank must make the same call"
            )

    @contextmanager
    def phase(self, what: str) -> Iterator[Agreement]:
        """Run the body; then agree that every rank got through it (or tell them this one did not). The body
        may set ``.check`` on what it is given: a fingerprint every rank must share."""
        ag = Agreement()
        try:
            yield ag
        except DistributedError:  # a peer failed at an agreement inside the body: every rank knows already
            raise
        except Exception as e:
            try:
                self.agree(what, e)
            except DistributedError:  # the group is broken too; our own error is the one to report
                pass
            raise
        self.agree(what, None, ag.check)

    def sum(self, t: Tensor, what: str) -> Tensor:
        """Σ over ranks of ``t``, in float64, as a new tensor on the group's device (an all-reduce: no rank holds
        W copies; ``t`` itself is left alone)."""
        t = t.to(device=self.device, dtype=torch.float64, memory_format=torch.contiguous_format, copy=True)
        work = dist.all_reduce(t, group=self.group, async_op=True)
        self._wait(work, what)
        return t

    def gather_varying(self, flat: Tensor, sizes: list[int], what: str) -> list[Tensor]:
        """Every rank's 1-D float64 ``flat``, whose lengths ``sizes[r]`` every rank knows."""
        m = max(sizes)
        buf = torch.zeros(m, dtype=torch.float64)
        buf[: flat.numel()] = flat
        got = self.all_gather(buf, what)
        return [got[r, : sizes[r]] for r in range(self.world)]


def phase(comm: Comm | None, what: str):
    """``comm.phase(what)``, or nothing when measuring locally."""
    return nullcontext(Agreement()) if comm is None else comm.phase(what)


@dataclass
class Part:
    """One rank's share of one risk set."""

    totals: Tensor  #: [K, G] Σ_{b here} c_b e_b (+ autograd columns)
    loss: float  #: Σ_{b here} c_b ℓ_b
    n: Tensor  #: [B] labelled tokens
    c: Tensor  #: [B] union weights
    e: Tensor | None  #: [K, B, G] per-instance values (None on the sharded strategy)


def union_counts(
    comm: Comm | None, n: dict[str, Tensor], reduction: str
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Per risk set: the union's pool size D (``loss.pool_size`` summed over ranks), and each rank's B."""
    local = torch.tensor([[v.shape[0], int(pool_size(v, reduction))] for v in n.values()], dtype=torch.int64)
    allr = local[None] if comm is None else comm.all_gather(local, "sharing batch sizes")
    D = {r: float(allr[:, i, 1].sum()) for i, r in enumerate(n)}
    sizes = {r: [int(x) for x in allr[:, i, 0]] for i, r in enumerate(n)}
    return D, sizes


def combine(comm: Comm, parts: dict[str, Part], sizes: dict[str, list[int]], K: int, G: int) -> dict[str, Part]:
    """The union of every rank's parts: totals and losses summed, per-sample values concatenated in rank order."""
    with_e = next(iter(parts.values())).e is not None
    row = K * G if with_e else 0

    def length(r: int) -> int:
        return sum(K * G + 1 + sizes[name][r] * (2 + row) for name in parts)

    chunks = []
    for p in parts.values():
        chunks += [p.totals.reshape(-1), torch.tensor([p.loss], dtype=torch.float64), p.n.double(), p.c]
        if with_e:
            chunks.append(p.e.permute(1, 0, 2).reshape(-1))  # [B, K, G] rows
    flat = torch.cat(chunks)
    got = comm.gather_varying(flat, [length(r) for r in range(comm.world)], "gathering results")
    out: dict[str, Part] = {}
    offs = [0] * comm.world
    for name in parts:
        totals, loss, ns, cs, es = torch.zeros(K, G, dtype=torch.float64), 0.0, [], [], []
        for r in range(comm.world):
            x, o, B = got[r], offs[r], sizes[name][r]
            totals += x[o : o + K * G].reshape(K, G)
            loss += float(x[o + K * G])
            o += K * G + 1
            ns.append(x[o : o + B].round().long())
            cs.append(x[o + B : o + 2 * B])
            o += 2 * B
            if with_e:
                es.append(x[o : o + B * row].reshape(B, K, G).permute(1, 0, 2))
                o += B * row
            offs[r] = o
        out[name] = Part(totals, loss, torch.cat(ns), torch.cat(cs), torch.cat(es, 1) if with_e else None)
    return out


def shard_of(v: Tensor, p: Tensor) -> Tensor:
    """This rank's shard of a stacked direction ``v`` [K, *shape] laid out as parameter ``p`` (a DTensor).

    A DTensor ``v`` is redistributed to ``p``'s placements (shifted by the K dimension; a no-op when it
    came from the sharded gradients); a plain one is sliced locally (every rank holds it whole).
    """
    placements = [Shard(pl.dim + 1) for pl in p.placements]
    if isinstance(v, DTensor):
        v = v.redistribute(p.device_mesh, placements)
    else:
        v = distribute_tensor(v, p.device_mesh, placements, src_data_rank=None)
    return v.to_local()


def reduce_scale(p: Tensor) -> float:
    """What FSDP2 divides a sharded gradient by (its default mean over the shard group), to undo it; 1 for a
    plain parameter (whose gradient stays local: the model is measured unwrapped of DDP)."""
    return float(dist.get_world_size(p.device_mesh.get_group())) if isinstance(p, DTensor) else 1.0


__all__ = ["Comm", "DistributedError", "gather_async", "local_part", "resolve_group", "sharded_mesh"]
