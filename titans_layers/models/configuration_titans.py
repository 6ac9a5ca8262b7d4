"""``TitansConfig``: one Hugging Face config for every Titans variant and hybrid stack."""

from __future__ import annotations

from transformers import PretrainedConfig

from titans_layers.modules.checks import positive_finite, positive_int
from titans_layers.ops.common.triton_utils import MAX_HEAD_DIM
from titans_layers.ops.momentum_delta_rule.chunk import KERNEL_CHUNK_SIZES

# Titans block kinds (SPEC §3) and the fla token mixers a hybrid stack may hold.
TITANS_BLOCKS = ("mac", "mag", "mal", "lmm", "swa")
FLA_BLOCKS = ("gated_deltanet", "deltanet", "mamba2")
BLOCK_TYPES = TITANS_BLOCKS + FLA_BLOCKS
VARIANTS = ("mac", "mag", "mal", "lmm", "mac_mal")
MEMORIES = ("linear", "mlp")
MEMORY_ACTIVATIONS = ("silu", "gelu")
GATE_ACTIVATIONS = ("sigmoid", "silu")
MEMORY_BACKENDS = ("auto", "triton", "torch")
AUTO_MLP_MAX_UPDATE_NORM = 0.1  # max_update_norm="auto" for the MLP memory (docs/experiments.md)


def variant_block_types(variant: str, num_layers: int) -> list[str]:
    """The per-layer block kinds of a preset.

    ``"mac"``, ``"mag"``, ``"mal"``, ``"lmm"``: that block in every layer. ``"mac_mal"``: MAC and
    MAL alternate, MAC first (``mac, mal, mac, mal, ...``): the MAC layers give every segment the
    long-term context as attention tokens, the MAL layers between them refresh the memory from
    the deeper representation at half the MAC cost.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
    if variant == "mac_mal":
        return ["mac" if i % 2 == 0 else "mal" for i in range(num_layers)]
    return [variant] * num_layers


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")
    return value


class TitansConfig(PretrainedConfig):
    """Configuration of :class:`~titans_layers.models.TitansModel` and
    :class:`~titans_layers.models.TitansForCausalLM` (``model_type="titans"``).

    Stack:
        vocab_size, hidden_size (D), num_hidden_layers, num_heads (memory and attention heads),
        num_kv_heads (attention KV heads, default num_heads), head_dim (default D // num_heads).
        variant: "mac", "mag", "mal", "lmm" or "mac_mal" (see :func:`variant_block_types`).
        block_types: an explicit per-layer list of kinds from ``BLOCK_TYPES`` ("mac", "mag",
            "mal", "lmm", "swa", "gated_deltanet", "deltanet", "mamba2"), one per layer; overrides
            ``variant``. After construction ``block_types`` always holds the resolved list.
        hidden_ratio / intermediate_size: SwiGLU MLP width (``intermediate_size`` wins; default
            ``hidden_ratio * D`` rounded up to a multiple of 32). norm_eps, initializer_range.

    Memory (``NeuralMemory`` options, SPEC §2):
        memory: "linear" | "mlp"; chunk_size (tokens per memory chunk); mlp_expansion,
        memory_activation ("silu" | "gelu"), mlp_residual (MLP memory); use_short_conv, conv_size;
        max_step_size (bound of theta); max_update_norm (update clipping, the bound ``c`` of
        ``NeuralMemory``: a positive number, None for none, or "auto" (default): 0.1 for the MLP
        memory, none for the linear one; an unclipped MLP memory diverged in training, see
        ``docs/experiments.md``); use_output_gate, use_output_norm; memory_backend
        ("auto" | "triton" | "torch").

    Attention and Titans blocks:
        segment_size: MAC segment length (MAC attends within its segment, so this is also its
            attention span). window_size: sliding window of MAG, MAL and "swa" blocks.
        num_persistent_tokens: N_p learned tokens per Titans attention (MAC, MAG, MAL; 0 = none).
        num_retrieval_queries: how MAC reads its memory at a segment start. 0 (default): with the
            segment's own queries, one retrieved token per segment position, position j seeing
            retrieved token i only when i <= j. R > 0: with R learned queries per MAC block, R
            retrieved tokens per segment that depend only on the memory before the segment, so
            every position of the segment sees all of them (SPEC §3's option).
        rope_base: rotary base. gate_activation: MemoryGate non-linearity ("sigmoid" | "silu").

    fla mixers:
        fla_mixer_kwargs: ``{kind: {argument: value}}`` passed on to fla's layer constructors
            (e.g. ``{"mamba2": {"state_size": 64}}``), on top of the width and head settings above.

    Every field is checked here; a bad value raises a ``ValueError`` naming the field.
    """

    model_type = "titans"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, num_hidden_layers: int = 8,
                 num_heads: int = 8, num_kv_heads: int | None = None, head_dim: int | None = None,
                 variant: str = "mac", block_types: list[str] | None = None,
                 memory: str = "linear", chunk_size: int = 16, mlp_expansion: int = 2,
                 memory_activation: str = "silu", mlp_residual: bool = False, use_short_conv: bool = True,
                 conv_size: int = 4, max_step_size: float = 0.1, max_update_norm: float | str | None = "auto",
                 use_output_gate: bool = True,
                 use_output_norm: bool = True, memory_backend: str = "auto",
                 segment_size: int = 64, window_size: int = 256, num_persistent_tokens: int = 4,
                 num_retrieval_queries: int = 0,
                 rope_base: float = 10000.0, gate_activation: str = "sigmoid",
                 fla_mixer_kwargs: dict | None = None,
                 hidden_ratio: int = 4, intermediate_size: int | None = None, norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, use_cache: bool = True, pad_token_id: int | None = None,
                 bos_token_id: int | None = 1, eos_token_id: int | None = 2, tie_word_embeddings: bool = False,
                 **kwargs):
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.num_hidden_layers = positive_int("num_hidden_layers", num_hidden_layers)
        self.num_heads = positive_int("num_heads", num_heads)
        self.num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` ({num_kv_heads})")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}) "
                             "when `head_dim` is not given")
        self.head_dim = hidden_size // num_heads if head_dim is None else positive_int("head_dim", head_dim)

        self.variant = _choice("variant", variant, VARIANTS)
        if block_types is None:
            block_types = variant_block_types(variant, num_hidden_layers)
        if not isinstance(block_types, (list, tuple)) or len(block_types) != num_hidden_layers:
            raise ValueError(f"`block_types` must be a list of {num_hidden_layers} block kinds "
                             f"(`num_hidden_layers`), got {block_types!r}")
        for i, kind in enumerate(block_types):
            if kind not in BLOCK_TYPES:
                raise ValueError(f"`block_types[{i}]` must be one of {BLOCK_TYPES}, got {kind!r}")
        self.block_types = list(block_types)

        self.memory = _choice("memory", memory, MEMORIES)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.mlp_expansion = positive_int("mlp_expansion", mlp_expansion)
        self.memory_activation = _choice("memory_activation", memory_activation, MEMORY_ACTIVATIONS)
        self.mlp_residual = _flag("mlp_residual", mlp_residual)
        self.use_short_conv = _flag("use_short_conv", use_short_conv)
        self.conv_size = positive_int("conv_size", conv_size)
        self.max_step_size = positive_finite("max_step_size", max_step_size)
        if max_update_norm is not None and max_update_norm != "auto":
            max_update_norm = positive_finite("max_update_norm", max_update_norm)
        self.max_update_norm = max_update_norm
        self.use_output_gate = _flag("use_output_gate", use_output_gate)
        self.use_output_norm = _flag("use_output_norm", use_output_norm)
        self.memory_backend = _choice("memory_backend", memory_backend, MEMORY_BACKENDS)
        if memory_backend == "triton" and (chunk_size not in KERNEL_CHUNK_SIZES or self.head_dim > MAX_HEAD_DIM):
            raise ValueError(f"`memory_backend='triton'` needs `chunk_size` in {KERNEL_CHUNK_SIZES} and `head_dim` <= "
                             f"{MAX_HEAD_DIM} (the Triton kernels' tiles), got chunk_size = {chunk_size}, "
                             f"head_dim = {self.head_dim}")

        self.segment_size = positive_int("segment_size", segment_size)
        self.window_size = positive_int("window_size", window_size)
        self.num_persistent_tokens = _non_negative_int("num_persistent_tokens", num_persistent_tokens)
        self.num_retrieval_queries = _non_negative_int("num_retrieval_queries", num_retrieval_queries)
        self.rope_base = positive_finite("rope_base", rope_base)
        self.gate_activation = _choice("gate_activation", gate_activation, GATE_ACTIVATIONS)

        fla_mixer_kwargs = {} if fla_mixer_kwargs is None else fla_mixer_kwargs
        if not isinstance(fla_mixer_kwargs, dict) or any(
                k not in FLA_BLOCKS or not isinstance(v, dict) for k, v in fla_mixer_kwargs.items()):
            raise ValueError(f"`fla_mixer_kwargs` must map kinds from {FLA_BLOCKS} to dicts of constructor "
                             f"arguments, got {fla_mixer_kwargs!r}")
        self.fla_mixer_kwargs = {k: dict(v) for k, v in fla_mixer_kwargs.items()}

        self.hidden_ratio = positive_int("hidden_ratio", hidden_ratio)
        self.intermediate_size = None if intermediate_size is None else \
            positive_int("intermediate_size", intermediate_size)
        self.norm_eps = positive_finite("norm_eps", norm_eps)
        self.initializer_range = positive_finite("initializer_range", initializer_range)
        self.use_cache = _flag("use_cache", use_cache)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def memory_max_update_norm(self) -> float | None:
        """The memory's update clipping bound: ``max_update_norm``, with "auto" resolved (0.1 for the
        MLP memory, None for the linear one)."""
        if self.max_update_norm == "auto":
            return AUTO_MLP_MAX_UPDATE_NORM if self.memory == "mlp" else None
        return self.max_update_norm

    @property
    def mlp_intermediate_size(self) -> int:
        """Width of the SwiGLU MLP: ``intermediate_size``, else ``hidden_ratio * D`` rounded up to 32."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-self.hidden_ratio * self.hidden_size // 32) * 32
