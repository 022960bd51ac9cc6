"""The Qwen (v1) architecture for transformers 5.

``import qwen`` registers ``model_type="qwen"`` with the Auto classes, so ``AutoConfig``,
``AutoModelForCausalLM`` and ``AutoTokenizer`` load original hub checkpoints with our code and without
``trust_remote_code`` (transformers prefers registered local code over a config's ``auto_map``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from . import _import_noise  # noqa: F401  first: quiets libraries that log while transformers imports them
from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .tokenization_qwen import QWenTokenizer

AutoConfig.register("qwen", QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "QWenTokenizer"]
