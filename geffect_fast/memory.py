"""Memory and communication of one measurement, per GPU: a model to plan runs with (docs/scaling.md).

For a Llama-style decoder (``hidden`` h, ``layers`` L, ``intermediate`` I, ``heads``, ``kv_heads``, vocab V)
measured on B sequences of T tokens per GPU. Byte sizes: weights p, activations a (= p), direction d.

Weights              P·p, or P·p/W under FSDP + the unsharded working set: the root unit (embedding, head),
                     which FSDP2 keeps gathered from forward to backward, and two blocks (prefetch)
Direction            K·P·d, or K·P·d/W sharded; the "taps" strategy under FSDP adds the gathered directions of
                     the module in its backward hook and of the next one, gathered ahead: ≤ 2·K·max|θ_i|·d
Activations          what the backward needs, per token and layer (HF Llama, sdpa, every parameter frozen,
                     our taps saving layer inputs — the tensors ordinary training saves for its weight
                     gradients, so the same sum):
                       a·(7h + 2h_kv + 4I)  [norm inputs x₁ x₂, normed n₁ n₂, q k v, attention output and
                                              its transposed copy, gate, silu(gate), up, gate·up]
                       + 8h if a < 4         [HF's RMSNorm upcasts its input to float32 and saves that copy]
                       + 8 + 4·heads         [two rsqrt per token, attention log-sum-exp]
                     with gradient checkpointing per block: a·h per layer
Logits               3·4·B·T·V at the start of the backward (float32 log-softmax output, its gradient and
                     the logits' gradient), plus a·B·T·h for the final norm's output; with checkpointing,
                     the larger of that and one block's full set while it is recomputed (they come one
                     after the other)
Transient            one reference-op tile (4 MiB) + the per-sample outputs K·B·G·8 — nothing O(B·|θ|)
Gradients            none on the taps strategy; the sharded strategy (FSDP aggregates) holds the sharded gradient
                     P·p/W, and unsharded ones until reduce-scattered: one block's and the root unit's

Peak = weights + direction + transient + max(activations + logits, gradients): the activations peak at the
start of the backward and are freed as the gradients grow.

Communication per measurement and rank (ring collectives move (W−1)/W of the buffer):
DDP                  the per-sample results, W·B·(K·G+2)·8 bytes — no parameter or gradient traffic
FSDP, taps           FSDP's own parameter all-gathers (forward and backward: 2·P·p·(W−1)/W) + the direction,
                     all-gathered layer by layer inside the backward, K·P·d·(W−1)/W
FSDP, sharded        the parameter all-gathers + one gradient reduce-scatter, P·p·(W−1)/W, + K·G scalars —
                     an ordinary FSDP training step's traffic

Checked against tensor peaks measured on scaled-down configs by ``python -m benchmarks.memory_model``
(benchmarks/results/memory_model.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20
GiB = 1 << 30
TILE = 4 << 20  # geffect_fast.ops.reference.TILE_BYTES


@dataclass(frozen=True)
class Config:
    """A Llama-style decoder's shape."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_hf(cls, config) -> Config:
        """The shape of a Hugging Face Llama-style config (``hidden_size``, ``num_hidden_layers``, …)."""
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def to_hf(self, **overrides):
        """A ``transformers.LlamaConfig`` of this shape (for building scaled-down models to check against)."""
        from transformers import LlamaConfig

        kw = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
        )
        return LlamaConfig(**{**kw, **overrides})

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def block_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_hidden
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.block_params + emb * (1 if self.tied else 2) + self.hidden

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks (embedding, head, final norm): FSDP's root unit."""
        return self.params - self.layers * self.block_params

    @property
    def largest_param(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


#: Llama-2 shapes (Touvron et al. 2023)
LLAMA2 = {
    "7B": Config(4096, 32, 11008, 32, 32, 32000),
    "13B": Config(5120, 40, 13824, 40, 40, 32000),
    "70B": Config(8192, 80, 28672, 64, 8, 32000),
}


@dataclass
class Estimate:
    """Bytes per GPU by component, and bytes communicated per rank per measurement."""

    weights: float
    direction: float
    activations: float
    logits: float
    transient: float
    gradients: float
    communication: float
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """The peak: activations and logits peak at the start of the backward, the gradients (sharded strategy)
        at its end, as the activations are freed — so the larger of the two, not their sum."""
        return self.weights + self.direction + self.transient + max(self.activations + self.logits, self.gradients)

    def as_row(self) -> dict[str, float]:
        keys = ("weights", "direction", "activations", "logits", "transient", "gradients", "total", "communication")
        return {k: getattr(self, k) for k in keys}


def activation_bytes_per_token_layer(cfg: Config, a: int) -> float:
    """Bytes the backward keeps per token and layer (no checkpointing); see the module docstring."""
    h, i, kv = cfg.hidden, cfg.intermediate, cfg.kv_hidden
    return a * (7 * h + 2 * kv + 4 * i) + (8 * h if a < 4 else 0) + 8 + 4 * cfg.heads


def estimate(
    cfg: Config,
    batch: int,
    seq: int,
    *,
    param_bytes: int = 2,
    direction_bytes: int = 2,
    directions: int = 1,
    groups: int | None = None,
    world: int = 1,
    fsdp: bool = False,
    strategy: str = "taps",
    checkpointing: bool = False,
) -> Estimate:
    """Memory per GPU and communication per rank of one measurement (one risk set of ``batch`` × ``seq``
    tokens on each GPU) under DDP/single GPU (``fsdp=False``) or FSDP over ``world`` GPUs."""
    if strategy not in ("taps", "sharded"):
        raise ValueError(f"strategy must be 'taps' or 'sharded', got {strategy!r}")
    if strategy == "sharded" and not fsdp:
        raise ValueError("the sharded strategy exists only under FSDP")
    p, d, K = param_bytes, direction_bytes, directions
    P = cfg.params
    G = groups if groups is not None else cfg.layers + 3
    N = batch * seq
    shard = world if fsdp else 1
    ring = (world - 1) / world if world > 1 else 0.0
    # FSDP2 keeps the root unit (embedding, head) unsharded from forward to backward, and up to two blocks
    weights = P * p / shard + ((cfg.root_params + 2 * cfg.block_params) * p if fsdp else 0)
    direction = K * P * d / shard
    if fsdp and strategy == "taps":  # the layer's gathered direction and the next one's, gathered ahead
        direction += 2 * K * cfg.largest_param * d
    per_layer = activation_bytes_per_token_layer(cfg, p)
    logits = 3 * 4 * N * cfg.vocab + p * N * cfg.hidden
    if checkpointing:
        # block inputs stay; the logits' peak and a recomputed block's activations come one after the other
        activations = N * cfg.layers * p * cfg.hidden
        logits = max(logits, N * per_layer)
    else:
        activations = N * cfg.layers * per_layer
    transient = TILE + K * batch * G * 8
    gradients = 0.0
    if strategy == "sharded":
        # the sharded gradient, plus unsharded ones until reduce-scattered (the root's: the whole backward)
        gradients = P * p / shard + (cfg.root_params + cfg.block_params) * p
    if not fsdp:
        comm = world * batch * (K * G + 2) * 8 if world > 1 else 0.0
    elif strategy == "taps":
        comm = 2 * P * p * ring + K * P * d * ring + world * batch * (K * G + 2) * 8
    else:
        comm = 2 * P * p * ring + P * p * ring + world * K * G * 8
    return Estimate(weights, direction, activations, logits, transient, gradients, comm)


__all__ = ["Config", "Estimate", "LLAMA2", "activation_bytes_per_token_layer", "estimate"]
