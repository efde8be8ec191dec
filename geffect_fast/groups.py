"""Parameter name -> group, for the layer-wise split e = Σ_g ⟨∇_g R, v_g⟩ (docs/design.md §1).

Schemes
-------
``"block"`` (default)
    ``embed``, ``block.0`` … ``block.{L-1}``, ``final_norm``, ``lm_head``. Every parameter lands in exactly
    one group, so the groups sum to the total.
``"paper"``
    The official G-effect code's five buckets (``dataloader_ge.py``, ``gradient_*_effect``): ``embed``;
    ``shallow`` = blocks 0–9; ``middle`` = 10–19; ``deep`` = blocks ≥ 20; ``lm`` = the LM head; the final norm
    goes where the official code's name loop leaves it, in the last block's bucket (``deep`` from 21 blocks
    on, ``shallow`` for a 4-block model). Absolute indices: a model with fewer than 11 blocks has only
    ``shallow``. (Unlike the official code, no DDP ``module.`` prefix is needed for blocks to be found.)
``"thirds"``
    The paper's three depths for any number of blocks L: block i goes to the third of the depth its middle
    falls in, ``shallow``/``middle``/``deep`` by ⌊3(i + ½)/L⌋ (0–9, 10–19, 20–29 for L = 30, so it equals
    ``paper`` there; symmetric: 7/8/7 blocks for L = 22, 1/2/1 for L = 4, shallow/deep for L = 2), the final
    norm with the last block (``deep``), plus ``embed`` and ``lm``.
``"module"``
    One group per parameter-owning module (``model.layers.3.self_attn.q_proj``, …), and one per expert of a
    fused MoE experts module (``model.layers.3.mlp.experts.5``: its stacked [E, ...] parameters split along
    their first dimension, :attr:`Grouping.parts`), so that a user can ask which experts carry unlearning.
a callable
    ``fn(parameter_name) -> group name``.

Only groups that own at least one parameter are listed, in model order.

The layout is found from the module tree, not from a list of names: the blocks are the ``nn.ModuleList``
holding the most parameters (Llama/Mistral/Qwen/Gemma/Phi ``model.layers``, GPT-2 ``transformer.h``,
GPT-NeoX ``gpt_neox.layers``, OPT ``model.decoder.layers``), wherever wrappers put it (DDP ``module.``,
PEFT ``base_model.model.``); the LM head is ``get_output_embeddings()`` where the model has it, else a
top-level ``lm_head``/``embed_out``; what is left goes to ``embed`` if it is an embedding (or named like
one) and to ``final_norm`` otherwise (the final norm, OPT's ``project_out``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Union

from torch import nn

GroupSpec = Union[str, Callable[[str], str]]
SCHEMES = ("block", "paper", "thirds", "module")
DEPTHS = ("shallow", "middle", "deep")

_HEAD_NAMES = ("lm_head", "embed_out")
_EMBED_HINT = re.compile(r"(emb|wte|wpe|project_in)", re.IGNORECASE)


@dataclass(frozen=True)
class Grouping:
    """Group names in order, and the group index of every parameter (by canonical name). ``parts``: for a
    stacked parameter split across groups (``"module"``: a fused MoE layer's [E, ...] expert weights), the group
    of each slice along its first dimension; ``of`` then holds the group of slice 0 and must not be used alone
    (:meth:`columns`)."""

    names: tuple[str, ...]
    of: dict[str, int]
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def columns(self, name: str) -> int | tuple[int, ...]:
        """The group of parameter ``name``, or the group of each of its slices (a tuple) where it is split."""
        return self.parts.get(name) or self.of[name]

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Layout:
    """Where the transformer blocks and the LM head sit in a model's module tree."""

    blocks: str | None  #: module name of the blocks' ModuleList
    n_blocks: int
    head: str | None  #: module name of the LM head


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, m in model.named_modules():
        if m is target:
            return name
    return None


def find_layout(model: nn.Module) -> Layout:
    """Locate the blocks (the ModuleList with the most parameters) and the LM head."""
    best, best_n, best_len = None, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n, best_len = name, n, len(m)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = _module_name(model, get_out())
        except (AttributeError, NotImplementedError):  # pragma: no cover - models without a head
            head = None
    if head is None:
        for name, _ in model.named_modules():
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES and (best is None or not name.startswith(best + ".")):
                head = name
                break
    return Layout(blocks=best, n_blocks=best_len, head=head)


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def block_group(model: nn.Module, layout: Layout | None = None) -> Callable[[str], str]:
    """The ``block`` scheme as a function of the canonical parameter name."""
    layout = layout or find_layout(model)
    modules = dict(model.named_modules())

    def fn(pname: str) -> str:
        if _under(pname, layout.blocks):
            return f"block.{int(pname[len(layout.blocks) + 1 :].split('.', 1)[0])}"
        if _under(pname, layout.head):
            return "lm_head"
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        mod = modules.get(owner)
        if isinstance(mod, nn.Embedding) or _EMBED_HINT.search(owner.rsplit(".", 1)[-1] if owner else pname):
            return "embed"
        return "final_norm"

    return fn


def paper_bucket(block_name: str, n_blocks: int) -> str:
    """Map a ``block``-scheme group to the official code's bucket (the final norm: the last block's)."""
    if block_name == "final_norm":
        return paper_bucket(f"block.{n_blocks - 1}", n_blocks) if n_blocks > 0 else "deep"
    if block_name.startswith("block."):
        i = int(block_name.split(".", 1)[1])
        return "shallow" if i < 10 else "middle" if i < 20 else "deep"
    return {"embed": "embed", "lm_head": "lm"}[block_name]


def thirds_bucket(block_name: str, n_blocks: int) -> str:
    """Map a ``block``-scheme group to its third of the depth: block i of L -> DEPTHS[⌊3(i + ½)/L⌋]."""
    if block_name == "final_norm":
        return thirds_bucket(f"block.{n_blocks - 1}", n_blocks) if n_blocks > 0 else "deep"
    if block_name.startswith("block."):
        return DEPTHS[(6 * int(block_name.split(".", 1)[1]) + 3) // (2 * n_blocks)]
    return {"embed": "embed", "lm_head": "lm"}[block_name]


_PAPER_ORDER = ("embed", *DEPTHS, "lm")


def stacked_experts(module: nn.Module) -> tuple[str, ...]:
    """The local names of a fused MoE experts module's stacked parameters ([E, ...], E experts: a class named
    ``*Experts`` holding a 3-D parameter), or () for any other module."""
    if not type(module).__name__.endswith("Experts"):
        return ()
    params = dict(module.named_parameters(recurse=False))
    E = next((p.shape[0] for p in params.values() if p.dim() == 3), None)
    if E is None:
        return ()
    return tuple(k for k, p in params.items() if p.dim() >= 2 and p.shape[0] == E)


def _by_module(model: nn.Module, param_names: list[str]) -> Grouping:
    """The ``module`` scheme: the owning module's name, one group per expert for stacked expert parameters."""
    split: dict[str, int] = {}
    for mname, m in model.named_modules():
        for local in stacked_experts(m):
            split[f"{mname}.{local}" if mname else local] = getattr(m, local).shape[0]
    index: dict[str, int] = {}
    of: dict[str, int] = {}
    parts: dict[str, tuple[int, ...]] = {}
    for n in param_names:
        owner = n.rsplit(".", 1)[0] if "." in n else n
        labels = [f"{owner}.{e}" for e in range(split[n])] if n in split else [owner]
        cols = tuple(index.setdefault(g, len(index)) for g in labels)
        of[n] = cols[0]
        if n in split:
            parts[n] = cols
    return Grouping(names=tuple(index), of=of, parts=parts)


def assign(model: nn.Module, spec: GroupSpec, param_names: list[str]) -> Grouping:
    """Group every name in ``param_names`` (canonical names of ``model``) by ``spec``."""
    if callable(spec):
        fn = spec
    elif spec == "block":
        fn = block_group(model)
    elif spec in ("paper", "thirds"):
        layout = find_layout(model)
        bfn = block_group(model, layout)
        bucket = paper_bucket if spec == "paper" else thirds_bucket

        def fn(n: str) -> str:
            return bucket(bfn(n), layout.n_blocks)
    elif spec == "module":
        return _by_module(model, param_names)
    else:
        raise ValueError(f"unknown groups {spec!r}; use one of {', '.join(SCHEMES)} or a callable name -> group")
    labels: dict[str, str] = {}
    for n in param_names:
        g = fn(n)
        if not isinstance(g, str) or not g:
            raise ValueError(f"groups callable returned {g!r} for parameter {n!r}; expected a non-empty str")
        labels[n] = g
    order: list[str] = []
    seen: set[str] = set()
    for g in labels.values():
        if g not in seen:
            seen.add(g)
            order.append(g)
    if spec in ("paper", "thirds"):
        order = [g for g in _PAPER_ORDER if g in seen]
    elif spec == "block":
        rank = {"embed": (0, 0), "final_norm": (2, 0), "lm_head": (3, 0)}
        order.sort(key=lambda g: rank.get(g, (1, int(g.split(".")[1]) if g.startswith("block.") else 0)))
    index = {g: i for i, g in enumerate(order)}
    return Grouping(names=tuple(order), of={n: index[g] for n, g in labels.items()})
