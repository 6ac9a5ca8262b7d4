"""How the Titans models meet Transformers' ``generate()`` across its versions.

Transformers renamed the cache: up to 5.23 a model takes and returns it as ``past_key_values``;
from 5.24 on ``generate()`` passes it as ``cache`` and the output classes declare a ``cache`` field
(``past_key_values`` is a deprecated alias there, to be removed). The models take both keywords
(:func:`~titans_layers.modules.checks.resolve_cache`), build their outputs with whichever field the
installed version declares (:func:`model_output`, :func:`lm_output`), and generate through
:class:`TitansGenerationMixin`, which leaves the keyword to Transformers itself.
"""

from __future__ import annotations

import dataclasses

from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


def cache_field(output_class: type) -> str:
    """The name of the cache field of a Transformers output class: ``"cache"`` (5.24 and later)
    or ``"past_key_values"`` (earlier)."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


# read once at import: ``torch.compile`` does not trace ``dataclasses.fields``
MODEL_CACHE_FIELD = cache_field(BaseModelOutputWithPast)
LM_CACHE_FIELD = cache_field(CausalLMOutputWithPast)


def model_output(cache, **fields) -> BaseModelOutputWithPast:
    """``BaseModelOutputWithPast(**fields)`` with ``cache`` under the installed Transformers'
    field name, so neither version warns about or drops it."""
    return BaseModelOutputWithPast(**fields, **{MODEL_CACHE_FIELD: cache})


def lm_output(cache, **fields) -> CausalLMOutputWithPast:
    """``CausalLMOutputWithPast(**fields)`` with ``cache`` under the installed Transformers' field name."""
    return CausalLMOutputWithPast(**fields, **{LM_CACHE_FIELD: cache})


def model_cache(output: BaseModelOutputWithPast):
    """The cache held by a :func:`model_output` (None if none)."""
    return getattr(output, MODEL_CACHE_FIELD)


class TitansGenerationMixin(GenerationMixin):
    """Transformers' ``GenerationMixin`` for models whose state is recurrent.

    Transformers must not create its own ``DynamicCache`` (a key/value cache the layers cannot
    use): the model creates a :class:`~titans_layers.models.cache.TitansCache` on its first cached
    call and Transformers hands it back on every later step, under its own keyword. Unlike fla's
    ``FLAGenerationMixin`` (0.6), which passes the cache on as ``past_key_values`` and so depends on
    Transformers' deprecation shim from 5.24 on, nothing here names the keyword.
    """

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False
