"""Flax models written for jaxmerge, compatible with Hugging Face checkpoints: a BERT encoder
(linen) and a Llama decoder (NNX)."""

from .bert import BertConfig as BertConfig
from .bert import BertModel as BertModel
from .bert import BertOutput as BertOutput
from .bert import mean_pool as mean_pool
from .llama import LlamaConfig as LlamaConfig
from .llama import LlamaForCausalLM as LlamaForCausalLM
from .llama import rope as rope
