"""The direction protocol: what dense and factored directions share, written once.

A direction holds K named directions over a model's parameters: per parameter an *entry* (a stacked tensor
[K, *shape] for :class:`~geffect_fast.directions.dense.Direction`, a
:class:`~geffect_fast.engine.factors.FactoredEntry` for
:class:`~geffect_fast.directions.factored.FactoredDirection`), and the names of parameters known to have a
zero direction (recorded, not stored). :class:`DirectionBase` gives both kinds the same binding to a model
(canonical names across wrapper prefixes, one entry per parameter, shape/dtype/device/finite checks, every
trainable parameter accounted for), the same selection of one direction by name, and the same stacking.

The kinds register themselves in :data:`KINDS` ("dense", "factored"), so that a constructor of one kind can
return the other (``Direction.from_objective(..., factored=True)``, stacking a dense with a factored one)
without the modules importing each other.
"""

from __future__ import annotations

from typing import Any, Container, Iterable, Mapping

from torch import nn

#: wrapper path components that do not change which parameter a name refers to
_WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

#: the direction classes by kind ("dense", "factored"), registered by the modules that define them
KINDS: dict[str, type[DirectionBase]] = {}


def canonical_key(key: str, names: Mapping[str, Any]) -> str | None:
    """The name in ``names`` that ``key`` refers to, allowing for DDP/compile/FSDP wrapper prefixes."""
    if key in names:
        return key
    stripped = key
    for part in _WRAPPER_PARTS:
        stripped = stripped.replace(part, "")
    if stripped in names:
        return stripped
    return None


def check_complete(trainable: Iterable[str], mentioned: Container[str], remedy: str) -> None:
    """A KeyError naming the trainable parameters a direction has no entry for (the first five), with ``remedy``."""
    missing = [n for n in trainable if n not in mentioned]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(
            f"direction has no entry for trainable parameter(s) {missing[:5]}{more}; {remedy} on parameters "
            "outside the direction"
        )


def _unknown_key(key: str, params: Mapping[str, nn.Parameter]) -> str:
    """Why ``key`` names no parameter, with the likely cause for a tied head."""
    base = f"direction entry {key!r} names no parameter of the model"
    if key.rsplit(".", 2)[-2:] in (["lm_head", "weight"], ["embed_out", "weight"]):
        return base + (
            " (a head tied to the input embeddings has no parameter of its own: key its direction by the embedding's "
            "name, which holds the gradient of both uses)"
        )
    return base


class DirectionBase:
    """K named directions over a model's parameters (see the module docstring). Subclasses give their entries
    (:meth:`keys`, :meth:`entry`), what an entry's shape, device and values are, and how to select one
    direction; binding, indexing by name and stacking are written here."""

    #: the kind under which the class is registered in :data:`KINDS`
    kind = ""
    names: tuple[str, ...]
    zero: frozenset[str]

    # -- what a kind gives -----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        raise NotImplementedError

    def entry(self, key: str) -> Any:
        """The entry of parameter ``key`` (a stacked tensor, or a factored entry)."""
        raise NotImplementedError

    def _entry_shape(self, e: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_entry(self, key: str, canonical: str, e: Any, p: nn.Parameter) -> bool:
        """Check ``e`` against parameter ``p`` (dtype, values) and return whether it is nonzero."""
        raise NotImplementedError

    def _select(self, i: int) -> DirectionBase:
        """Direction ``i`` alone, as a direction of its own kind."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of directions."""
        return len(self.names)

    @property
    def factored(self) -> bool:
        return self.kind == "factored"

    def __getitem__(self, name: str) -> DirectionBase:
        """One direction by name, as a direction of its own (sharing the entries' storage)."""
        if name not in self.names:
            raise KeyError(f"no direction {name!r}; have {', '.join(self.names)}")
        return self._select(self.names.index(name))

    def bind(self, params: Mapping[str, nn.Parameter], trainable: Iterable[str]) -> dict[str, Any]:
        """Check the direction against a model and return {canonical name: entry} for the parameters whose
        direction is nonzero.

        Raises for an entry naming no parameter, two entries naming one parameter (``module.x`` beside ``x``), a
        wrong shape, dtype or device, a non-finite value, or a trainable parameter (``requires_grad``) that the
        direction does not mention.
        """
        out: dict[str, Any] = {}
        mentioned: set[str] = set()
        for key in self.zero:
            c = canonical_key(key, params)
            if c is not None:
                mentioned.add(c)
        first: dict[str, str] = {}
        for key in self.keys():
            c = canonical_key(key, params)
            if c is None:
                raise KeyError(_unknown_key(key, params))
            if c in first:
                raise KeyError(
                    f"direction entries {first[c]!r} and {key!r} both name parameter {c!r} (wrapper prefixes such as "
                    "'module.' are ignored); keep one of them"
                )
            first[c] = key
            p = params[c]
            mentioned.add(c)
            e = self.entry(key)
            shape = tuple(self._entry_shape(e))
            if shape != tuple(p.shape):
                raise ValueError(f"direction for {c!r} has shape {shape}, the parameter {tuple(p.shape)}")
            if e.device != p.device:
                raise ValueError(f"direction for {c!r} is on {e.device} but the parameter is on {p.device}")
            if self._check_entry(key, c, e, p):
                out[c] = e
        check_complete(trainable, mentioned, self._remedy)
        return out

    #: what the completeness error suggests
    _remedy = "give them an entry, list them in Direction(..., zero=[...]), or set requires_grad=False"

    @staticmethod
    def stack_names(directions: Mapping[str, DirectionBase]) -> list[str]:
        """The names of a stack: a direction's key when it holds one, else ``key.name`` for each of its own."""
        if not directions:
            raise ValueError("stack() needs at least one direction")
        names: list[str] = []
        for key, d in directions.items():
            if not isinstance(d, DirectionBase):
                raise TypeError(f"stack() takes Directions, got {type(d).__name__} for {key!r}")
            names.extend([key] if d.k == 1 else [f"{key}.{n}" for n in d.names])
        return names

    @classmethod
    def stack(cls, directions: Mapping[str, DirectionBase]) -> DirectionBase:
        """Several named directions measured in one pass (K = total count); names as :meth:`stack_names` gives
        them. With a factored direction among them the stack is factored (the dense ones kept dense)."""
        cls.stack_names(directions)  # the argument checks
        kind = "factored" if any(d.factored for d in directions.values()) else "dense"
        return KINDS[kind]._stack(directions)

    @classmethod
    def _stack(cls, directions: Mapping[str, DirectionBase]) -> DirectionBase:
        raise NotImplementedError

    @staticmethod
    def entry_parts(directions: Mapping[str, DirectionBase], key: str) -> list[tuple[int, Any, str]]:
        """Parameter ``key``'s part in each direction of a stack that has one: (offset of that direction's first
        index in the stack, its entry, its key); a KeyError where a direction has none and does not list it zero."""
        parts: list[tuple[int, Any, str]] = []
        off = 0
        for dname, d in directions.items():
            if key in d.keys():
                parts.append((off, d.entry(key), dname))
            elif key not in d.zero:
                raise KeyError(f"direction {dname!r} has no entry for {key!r}, which others have")
            off += d.k
        return parts


def is_direction(x: Any) -> bool:
    return isinstance(x, DirectionBase)


__all__ = ["KINDS", "DirectionBase", "canonical_key", "check_complete", "is_direction"]
