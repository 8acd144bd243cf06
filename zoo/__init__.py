"""The sparse model zoo: `from zoo import load, list_models`.

Importing zoo also registers the zoo's configs with transformers' AutoConfig and
AutoModelForCausalLM, so that their `from_pretrained` reads zoo checkpoint folders.

Importing zoo before torch also asks torch for transparent huge pages on its large CPU tensors (on Linux):
it sets `THP_MEM_ALLOC_ENABLE=1` in this process's environment (so child processes inherit it) unless it is
set already; torch reads it once, when it loads, so importing zoo after torch changes nothing, and 0 opts
out. Without huge pages every fresh large buffer costs a page fault per 4 KiB: 8-18% of a fine-grained MoE
layer's CPU time here (BENCHMARKS.md, issue 18 item 4).
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
