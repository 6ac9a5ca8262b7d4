"""Hugging Face-compatible Titans models (MAC, MAG, MAL, LMM, hybrid stacks).

Importing this package registers ``model_type="titans"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from titans_layers.models.blocks import TitansBlock, cache_slots
from titans_layers.models.cache import TitansCache
from titans_layers.models.configuration_titans import BLOCK_TYPES, VARIANTS, TitansConfig, variant_block_types
from titans_layers.models.mac import MACMixer, MACState
from titans_layers.models.modeling_titans import TitansForCausalLM, TitansModel, TitansPreTrainedModel

AutoConfig.register(TitansConfig.model_type, TitansConfig, exist_ok=True)
AutoModel.register(TitansConfig, TitansModel, exist_ok=True)
AutoModelForCausalLM.register(TitansConfig, TitansForCausalLM, exist_ok=True)

__all__ = ["BLOCK_TYPES", "MACMixer", "MACState", "TitansBlock", "TitansCache", "TitansConfig", "TitansForCausalLM",
           "TitansModel", "TitansPreTrainedModel", "VARIANTS", "cache_slots", "variant_block_types"]
