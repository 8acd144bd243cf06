"""The sparse model zoo: `from zoo import load, list_models`.

Importing zoo also registers the zoo's configs with transformers' AutoConfig and
AutoModelForCausalLM, so that their `from_pretrained` reads zoo checkpoint folders.

On Linux, importing zoo before torch also asks torch for transparent huge pages on its large CPU tensors
(`THP_MEM_ALLOC_ENABLE=1`, read once when torch loads; set it to 0 to opt out): without them every fresh
large buffer costs a page fault per 4 KiB, which took a fifth to a third of a fine-grained MoE layer's CPU
time here (BENCHMARKS.md, issue 18 item 4).
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from zoo.catalog import CATALOG, Entry, list_models, register
from zoo.loading import load, load_checkpoint
from zoo.tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer

__all__ = ["CATALOG", "ByteTokenizer", "Entry", "list_models", "load", "load_checkpoint", "load_tokenizer",
           "register", "save_tokenizer"]
