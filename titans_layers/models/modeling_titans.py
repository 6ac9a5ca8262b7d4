"""``TitansModel`` and ``TitansForCausalLM``: one model base for every variant and hybrid stack."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.models.utils import Cache
from transformers.modeling_utils import PreTrainedModel

from titans_layers.models.blocks import SwiGLU, TitansBlock, cache_slots
from titans_layers.models.cache import TitansCache
from titans_layers.models.configuration_titans import TitansConfig
from titans_layers.models.generation import TitansGenerationMixin, lm_output, model_cache, model_output
from titans_layers.modules.checks import check_attention_mask, check_hidden_states, check_padding, resolve_cache


class TitansPreTrainedModel(PreTrainedModel):
    """Shared Transformers plumbing: config class, gradient checkpointing, weight initialisation.

    Initialisation: embeddings, the MLPs and the LM head are drawn from ``N(0, initializer_range)``;
    the token mixers (memory, attention, fla's layers) keep the initialisation of their own
    constructors (e.g. the memory's gate biases), which a generic re-initialisation would undo.
    """

    config_class = TitansConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TitansBlock"]
    _supports_cache_class = True
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, SwiGLU):
            for proj in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class TitansModel(TitansPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` :class:`~titans_layers.models.blocks.TitansBlock` of the
    kinds in ``config.block_types``, final RMSNorm.

    ``forward(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask [B, T_total] = None,
    past_key_values = None, use_cache = None, output_hidden_states = None, return_dict = None,
    cu_seqlens [N + 1] = None, cache = None) -> BaseModelOutputWithPast`` (``last_hidden_state
    [B, T, D]``). The cache comes as ``past_key_values`` or as ``cache`` (the keyword of
    Transformers >= 5.24; :mod:`~titans_layers.models.generation`), and goes back in the output's
    cache field, whichever name the installed Transformers gives it.
    ``attention_mask`` is a 0/1 padding mask (left padding when decoding; an all-ones mask is
    dropped); ``cu_seqlens`` packs N sequences into one row (B = 1). With ``use_cache`` the state
    of every stateful sublayer lives in fla's ``Cache`` (indices from
    :func:`~titans_layers.models.blocks.cache_slots`); a call without one creates a
    :class:`~titans_layers.models.cache.TitansCache`. ``cp_context`` (a
    :class:`~titans_layers.distributed.CPContext`): context parallelism, the inputs are this rank's
    slice ``[1, T / R]`` of one packed batch; it reaches every block, and the cache is off
    (``docs/distributed.md``).
    """

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(TitansBlock(config, kind, indices)
                                    for kind, indices in zip(config.block_types, cache_slots(config.block_types)))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of `input_ids` [B, T] and `inputs_embeds` [B, T, D]")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must have shape [B, T], got {list(input_ids.shape)}")
        D = self.config.hidden_size
        if inputs_embeds is not None:
            check_hidden_states(inputs_embeds, D, self.embeddings.weight.dtype, name="inputs_embeds")
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T, _ = hidden_states.shape
        if attention_mask is not None:  # an all-ones mask (what generate() passes) drops out, even with cu_seqlens
            check_attention_mask(attention_mask, B, T)
            if bool(attention_mask.all()):
                attention_mask = None
        check_padding(hidden_states, attention_mask, kwargs.get("cu_seqlens"))
        output_hidden_states = output_hidden_states if output_hidden_states is not None \
            else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training
                                                             and kwargs.get("cp_context") is None)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache and past_key_values is None:
            past_key_values = TitansCache()
        elif use_cache and not isinstance(past_key_values, Cache):
            past_key_values = TitansCache.from_legacy_cache(past_key_values)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, past_key_values = layer(hidden_states, attention_mask=attention_mask,
                                                   past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        past_key_values = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, past_key_values, all_hidden_states) if v is not None)
        return model_output(past_key_values, last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class TitansForCausalLM(TitansPreTrainedModel, TitansGenerationMixin):
    """:class:`TitansModel` with a linear LM head, next-token loss and ``generate()``.

    ``forward(..., labels [B, T] = None, logits_to_keep = 0, num_items_in_batch = None)
    -> CausalLMOutputWithPast``: ``logits [B, T', vocab]`` (all positions, or the last
    ``logits_to_keep`` when it is a positive int and no labels are given); with ``labels`` the
    loss is the cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` (-100 ignored;
    with packed ``cu_seqlens`` mask each sequence's first label yourself). The cache comes as
    ``past_key_values`` or ``cache``, as in :class:`TitansModel`. ``generate()``
    (:class:`~titans_layers.models.generation.TitansGenerationMixin`): the cache (a
    :class:`~titans_layers.models.cache.TitansCache`) is created on the first call; greedy,
    sampled and beam search work, with left padding.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> TitansModel:
        return self.model

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, past_key_values=None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, num_items_in_batch: int | torch.Tensor | None = None,
                **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         past_key_values=past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        hidden_states = out.last_hidden_state  # [B, T, D]
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif labels is None and isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)  # [B, T', vocab]
        loss = None
        if labels is not None and kwargs.get("cp_context") is not None:
            raise ValueError("under `cp_context` a rank's next-token labels cross into the next rank's slice: "
                             "compute the loss from the logits with targets shifted over the whole batch "
                             "(examples/train_cp_fsdp.py)")
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"`labels` must have shape [B, T] = {list(logits.shape[:2])}, "
                                 f"got {list(labels.shape)}")
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: the next token, -100 at the end
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten().to(logits.device),
                                   ignore_index=-100, reduction=reduction)
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        cache = model_cache(out)
        if not return_dict:
            rest = tuple(v for v in (cache, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return lm_output(cache, loss=loss, logits=logits, hidden_states=out.hidden_states)
