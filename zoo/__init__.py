"""The sparse model zoo: `from zoo import load, list_models`.

Importing zoo also registers the zoo's configs with transformers' AutoConfig and
AutoModelForCausalLM, so that their `from_pretrained` reads zoo checkpoint folders.
"""

from zoo.catalog import CATALOG, Entry, list_models, register
from zoo.loading import load, load_checkpoint
from zoo.tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer

__all__ = ["CATALOG", "ByteTokenizer", "Entry", "list_models", "load", "load_checkpoint", "load_tokenizer",
           "register", "save_tokenizer"]
