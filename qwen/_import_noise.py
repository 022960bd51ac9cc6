"""Imported first by `qwen`: libraries that log while being imported are kept at ERROR.

transformers imports every installed quantization back end while it loads, on every program start: torchao
(pulled in by GPT-QModel) logs about CUDA kernels a CPU machine lacks and makes torch log about its Enum
registrations; bitsandbytes (pulled in by peft) logs about optional CPU kernels. Their errors still show.
"""

import logging

NOISY_AT_IMPORT = ("torchao", "torch.utils._pytree", "bitsandbytes")

for name in NOISY_AT_IMPORT:
    logging.getLogger(name).setLevel(logging.ERROR)
