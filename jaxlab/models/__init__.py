"""Models: the decoder LM family and the BERT encoder, with loaders for pretrained weights."""

from jaxlab.models.archs import DECODER_ARCHS as DECODER_ARCHS
from jaxlab.models.bert import BertConfig as BertConfig
from jaxlab.models.bert import BertEncoder as BertEncoder
from jaxlab.models.bert import pool as pool
from jaxlab.models.decoder import Decoder as Decoder
from jaxlab.models.decoder import DecoderConfig as DecoderConfig
from jaxlab.models.decoder import KVCache as KVCache
from jaxlab.models.encode import encode as encode
from jaxlab.models.encode import encode_ids as encode_ids
from jaxlab.models.export import save_pretrained as save_pretrained
from jaxlab.models.loading import LoadError as LoadError
from jaxlab.models.lora import LoRAConfig as LoRAConfig
from jaxlab.models.lora import add_lora as add_lora
from jaxlab.models.lora import merge_lora as merge_lora
from jaxlab.models.lora import without_lora as without_lora
from jaxlab.models.registry import PRETRAINED as PRETRAINED
from jaxlab.models.registry import from_pretrained as from_pretrained
from jaxlab.models.registry import pretrained_names as pretrained_names
from jaxlab.models.registry import register_pretrained as register_pretrained
