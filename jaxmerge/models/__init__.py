"""Flax models written for jaxmerge: a BERT encoder compatible with Hugging Face checkpoints."""

from .bert import BertConfig as BertConfig
from .bert import BertModel as BertModel
from .bert import BertOutput as BertOutput
from .bert import mean_pool as mean_pool
