"""Token data for the trainer: load a corpus, tokenize it once into a cached flat array, pack it into
fixed-length blocks and serve batches whose order is a pure function of (seed, step)."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from zoo.tokenizer import ByteTokenizer, is_byte_tokenizer, text_bytes, token_byte_lengths, tokenizer_id, tokenizer_size

FORMAT_VERSION = 2  # bump when the cached token layout or the way documents are joined changes
BUNDLED_CORPUS = Path(__file__).parent / "corpus" / "jargon.txt.gz"
SEPARATOR = "\n\n"  # put between documents before packing
# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".txt.gz": "text", ".jsonl": "json", ".jsonl.gz": "json",
            ".json": "json", ".json.gz": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^\w[\w.-]*/\w[\w.-]*(:[\w.-]+)?$")  # "org/name" or "org/name:config"
_PROGRESS_MIN_BYTES = 5_000_000  # show a progress bar only for inputs at least this large
TEXT_DTYPES = ("string", "large_string", "null")  # `datasets` dtypes of a text column (null: every row empty)
# How the validation blocks are chosen: "interleaved" (every 1/val_fraction-th block, the default) or
# "tail" (the last val_fraction of the corpus: runs made before the interleaved split).
VAL_SPLITS = ("interleaved", "tail")


class DataFileError(ValueError):
    """A data file that cannot be read as text documents; the message names the file, the line and the field."""


class HubDatasetError(RuntimeError, ValueError):
    """A Hub dataset that could not be loaded (not found, offline, no such config or split)."""


def default_cache_dir() -> Path:
    """`$ZOO_CACHE/data`, else `~/.cache/zoo/data`."""
    return Path(os.environ.get("ZOO_CACHE", "~/.cache/zoo")).expanduser() / "data"


def _builder(path: str) -> str:
    suffix = next((s for s in sorted(BUILDERS, key=len, reverse=True) if path.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"unsupported file type {path!r}; supported extensions: {', '.join(BUILDERS)}")
    return BUILDERS[suffix]


def resolve_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Absolute paths of the files a path, glob, folder or list of those names, checked to exist."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise FileNotFoundError("source is an empty list of paths")
    files: list[str] = []
    for item in items:
        pattern = os.path.expanduser(os.fspath(item))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"no files match the glob {pattern!r}")
        elif os.path.isdir(pattern):
            matches = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file()
                             and any(p.name.endswith(s) for s in BUILDERS))
            if not matches:
                raise FileNotFoundError(f"folder {pattern!r} holds no {'/'.join(BUILDERS)} files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"no such file: {pattern!r}")
        files += [os.path.abspath(p) for p in matches]
    for f in files:
        _builder(f)  # fail on an unsupported extension before any work
    return files


def _is_hub_name(source: Any) -> bool:
    return (isinstance(source, str) and not os.path.exists(source) and bool(_HUB_NAME.match(source))
            and not any(source.endswith(s) for s in BUILDERS))


def _tokenizer_id(tokenizer: Any) -> tuple[str, int]:
    """What names a tokenizer in the token cache key: two tokenizers that give different ids never share one."""
    return tokenizer_id(tokenizer), tokenizer_size(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of a `vocab_size` vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _load_datasets(source: str | list[str], text_column: str, hf_cache: Path, *, config: str | None = None,
                   split: str = "train", streaming: bool = False) -> list[Any]:
    """The source as `datasets` datasets: one per builder (local files) or the Hub dataset's `split`.

    streaming=True gives IterableDatasets: rows are read (and downloaded) only as far as they are used.
    """
    import datasets  # imported here: a warm cache never needs it, and it is slow to import

    if isinstance(source, str):  # a Hub dataset name, "org/name" or "org/name:config"
        name, _, named_config = source.partition(":")
        config = config or named_config or None
        what = f"the Hub dataset {name!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
        try:
            parts = [datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=str(hf_cache))]
        except Exception as e:
            raise HubDatasetError(
                f"could not load {what} (it is not a local path either): {_root_cause(e)}. Check the name, "
                "--data-config and --split; pass local .txt/.jsonl/.parquet files instead, or, if the dataset "
                "is already in the Hugging Face cache, set HF_HUB_OFFLINE=1.") from e
    else:
        if split != "train" or config:
            raise ValueError("--split and --data-config choose a part of a Hub dataset; local files are read "
                             "whole (pass the files of the part you want)")
        groups: dict[str, list[str]] = {}
        for f in source:
            groups.setdefault(_builder(f), []).append(f)
        # local files are not streamed: they are on disk already, and max_tokens stops the tokenizing
        parts = [_load_files(datasets, b, fs, text_column, hf_cache) for b, fs in groups.items()]
    for part in parts:
        columns = part.column_names
        if columns is not None and text_column not in columns:
            raise ValueError(f"no text column {text_column!r} in {source!r}; its columns are {columns} "
                             "(choose one with --text-column)")
        feature = (part.features or {}).get(text_column)
        if feature is not None and getattr(feature, "dtype", None) not in TEXT_DTYPES:
            raise DataFileError(f"{source!r}: column {text_column!r} holds {feature}, not text")
    return [part.select_columns([text_column]) if part.column_names is not None else part for part in parts]


def _load_files(datasets: Any, builder: str, files: list[str], text_column: str, hf_cache: Path) -> Any:
    """The local files of one builder as one `datasets.Dataset`; a file it cannot read is a DataFileError."""
    # datasets casts a record's number or object to the first file's string column: check the types first
    # (a Parquet file's footer only). A text file's bytes are checked only if datasets fails to decode them.
    if builder != "text" and (problem := find_problem(files, builder, text_column)):
        raise problem
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)  # its error log would repeat, less precisely, what we raise
    try:  # a .txt file is one document; json/parquet rows are documents
        part = datasets.load_dataset(builder, data_files=files, cache_dir=str(hf_cache), split="train",
                                     **({"sample_by": "document"} if builder == "text" else {}))
    except Exception as e:  # datasets wraps the reader's error: find the file and line ourselves
        raise find_problem(files, builder, text_column) or DataFileError(
            f"cannot read {', '.join(files)}: {_root_cause(e)}") from e
    finally:
        datasets_log.setLevel(level)
    feature = (part.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", None) not in TEXT_DTYPES:
        raise find_problem(files, builder, text_column) or DataFileError(
            f"{', '.join(files)}: column {text_column!r} holds {feature}, not text")
    return part


# ---- finding what is wrong in a data file -----------------------------------------------------------------

def find_problem(files: Sequence[str], builder: str, text_column: str = "text") -> DataFileError | None:
    """The first problem in these data files as a DataFileError naming the file, line and field; None if none."""
    check = {"text": _text_problem, "json": _json_problem, "parquet": _parquet_problem}[builder]
    for file in files:
        try:
            problem = check(file, text_column)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            kind = "gzip" if file.endswith(".gz") else "data"
            problem = f": not a readable {kind} file ({type(e).__name__}: {e})"
        if problem:
            return DataFileError(f"{file}{problem}")
    return None


def _open_binary(file: str):
    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def _text_problem(file: str, text_column: str) -> str | None:
    """Where a text file stops being UTF-8: ":LINE: ..."; None when it is all UTF-8."""
    line, offset, pending = 1, 0, b""
    with _open_binary(file) as f:
        while True:
            chunk = f.read(1 << 20)
            data = pending + chunk
            if not data:
                return None
            try:
                data.decode("utf-8")
                good, pending = data, b""
            except UnicodeDecodeError as e:
                if chunk and e.end == len(data) and e.reason == "unexpected end of data":
                    good, pending = data[:e.start], data[e.start:]  # a character split by the chunk boundary
                else:
                    where = line + data[:e.start].count(b"\n")
                    return (f":{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
                            "is it a binary file?")
            line += good.count(b"\n")
            offset += len(good)


def _json_problem(file: str, text_column: str) -> str | None:
    """The first bad line (JSON Lines) or item (a JSON array) of a JSON file: ":LINE: ..." or ": item N: ..."."""
    with _open_binary(file) as f:
        array = not file.endswith((".jsonl", ".jsonl.gz")) and f.read(1 << 16).lstrip().startswith(b"[")
    if array:  # read whole, as datasets does
        with _open_binary(file) as f:
            data = f.read()
        try:
            records = json.loads(data)
        except json.JSONDecodeError as e:
            return f":{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        except UnicodeDecodeError as e:
            return f": not UTF-8 text ({e})"
        for i, record in enumerate(records, 1):
            if problem := _record_problem(record, text_column):
                return f": item {i}: {problem}"
        return None
    with _open_binary(file) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.rstrip(b"\r\n"))
            except json.JSONDecodeError as e:
                return f":{n}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
            except UnicodeDecodeError as e:
                return f":{n}: not UTF-8 text ({e})"
            if problem := _record_problem(record, text_column):
                return f":{n}: {problem}"
    return None


def _record_problem(record: Any, text_column: str) -> str | None:
    """What is wrong with one JSON record (an object whose text field is a string or absent), or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object with a {text_column!r} field, got {type(record).__name__}"
    value = record.get(text_column)
    if value is None or isinstance(value, str):
        return None
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"field {text_column!r} is {shown} ({type(value).__name__}); it must be a string"


def _parquet_problem(file: str, text_column: str) -> str | None:
    """Why a Parquet file cannot be read, or its text column is not text; None when neither."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, ValueError) as e:
        return f": not a readable Parquet file ({e})"
    if text_column in schema.names:
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return f": column {text_column!r} holds {kind} values, not text"
    return None


def _root_cause(error: BaseException) -> str:
    """The innermost cause of a wrapped error, as "Type: message"."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _encode_texts(tokenizer: Any, texts: list[str], with_special: bool = True) -> list[list[int]]:
    """The ids of each text; a transformers tokenizer encodes the batch at once (with its special tokens,
    e.g. a BOS per document, unless with_special=False)."""
    if getattr(tokenizer, "all_special_ids", None) is not None:  # a transformers tokenizer
        return tokenizer(texts, add_special_tokens=with_special, verbose=False)["input_ids"]
    return [tokenizer.encode(t) for t in texts]


def _batches(part: Any, size: int, source: Any) -> Iterator[dict]:
    """The batches of a dataset; a row that a streamed dataset cannot read is a DataFileError naming the source
    (a file's line is found before loading; a streamed Hub file is read only here)."""
    batches = part.iter(batch_size=size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 -- whatever the reader raised, one line naming the source
            raise DataFileError(f"{source}: cannot read the streamed rows: {_root_cause(e)}") from e
        yield batch


def _tokenize(parts: list[Any], text_column: str, tokenizer: Any, dtype: np.dtype,
              max_tokens: int | None = None, source: Any = "the corpus") -> np.ndarray:
    """One flat token array of all non-empty documents, joined by SEPARATOR; the first max_tokens tokens
    only when given (the rest of the corpus is then never read: a streamed dataset stops downloading)."""
    sep = np.asarray(_encode_texts(tokenizer, [SEPARATOR], with_special=False)[0], dtype=dtype)
    pieces: list[np.ndarray] = []
    count, as_bytes = 0, is_byte_tokenizer(tokenizer)
    sized = all(hasattr(part, "__len__") and hasattr(part, "data") for part in parts)
    big = max_tokens is None and sized and sum(part.data.nbytes for part in parts) >= _PROGRESS_MIN_BYTES
    if max_tokens is not None:
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=max_tokens < 10**7)
    else:
        bar = tqdm(total=sum(len(part) for part in parts) if sized else None, unit="doc", desc="tokenizing",
                   disable=not big)
    with bar:
        for part in parts:
            # a streamed dataset is read as far as the batches go: small ones stop close to max_tokens
            for batch in _batches(part, 1024 if sized else 128, source):
                if text_column not in batch:  # a streamed dataset says its columns only now
                    raise ValueError(f"no text column {text_column!r} in the dataset; its columns are "
                                     f"{sorted(batch)} (choose one with --text-column)")
                texts = [t for t in batch[text_column] if t]
                if max_tokens is None:
                    bar.update(len(batch[text_column]))
                if not texts:
                    continue
                if as_bytes:  # bytes are tokens: no Python work per token
                    ids = [np.frombuffer(SEPARATOR.join(texts).encode("utf-8"), np.uint8).astype(dtype)]
                else:
                    ids = [np.asarray(a, dtype=dtype) for a in _encode_texts(tokenizer, texts)]
                for a in ids:
                    new = [sep, a] if pieces else [a]
                    pieces += new
                    added = sum(len(x) for x in new)
                    count += added
                    if max_tokens is not None:
                        bar.update(min(added, max(0, max_tokens - count + added)))
                if max_tokens is not None and count >= max_tokens:
                    return np.concatenate(pieces)[:max_tokens]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _load_cached(path: Path) -> np.ndarray | None:
    """The token array cached at `path`, memory-mapped; None when absent or unreadable."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` so that readers see either no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def validation_blocks(num_blocks: int, val_fraction: float, val_split: str = "interleaved") -> np.ndarray:
    """Which of `num_blocks` blocks are held out for validation: a sorted index array, never empty.

    "interleaved": block i is held out when floor((i + 1) * f) > floor(i * f) for f = val_fraction (as an
    exact fraction): every 20th block for f = 0.05, floor(num_blocks * f) blocks spread over the corpus,
    and whether block i is held out depends on i and f alone, not on the seed, the model or the corpus
    length (so the blocks of a longer corpus that both hold are held out in both). "tail": the last
    int(num_blocks * f) blocks (the split of runs made before the interleaved one). At least one block.
    """
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split {val_split!r} is not one of {VAL_SPLITS}")
    if val_split == "tail":
        count = max(1, int(num_blocks * val_fraction))
        return np.arange(num_blocks - count, num_blocks)
    frac = Fraction(val_fraction).limit_denominator(10**6)
    i = np.arange(num_blocks, dtype=np.int64)
    held = np.flatnonzero((i + 1) * frac.numerator // frac.denominator > i * frac.numerator // frac.denominator)
    return held if len(held) else np.array([num_blocks - 1])


class TokenData:
    """A token stream packed into blocks of seq_len+1 tokens, some held out for validation (validation_blocks).

    `tokenizer` (when given) is what made the tokens: it says how many bytes of text they stand for (bpb).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float = 0.05,
                 cache_path: Path | None = None, val_split: str = "interleaved", tokenizer: Any = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokens, self.seq_len, self.cache_path = tokens, seq_len, cache_path
        self.block_len = seq_len + 1
        num_blocks = len(tokens) // self.block_len  # the tail that does not fill a block is dropped
        if num_blocks < 2:
            raise ValueError(f"the corpus has {len(tokens)} tokens; seq_len={seq_len} needs at least "
                             f"{2 * self.block_len} (one train and one validation block of {self.block_len})")
        self.val_split = val_split
        self.val_index = validation_blocks(num_blocks, val_fraction, val_split)
        held = np.zeros(num_blocks, dtype=bool)
        held[self.val_index] = True
        self.train_index = np.flatnonzero(~held)
        self.num_val_blocks = len(self.val_index)
        self.num_train_blocks = len(self.train_index)
        self.tokenizer = tokenizer
        self.byte_lengths = token_byte_lengths(tokenizer) if tokenizer is not None else None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def text_bytes(self, ids: torch.Tensor) -> int | None:
        """UTF-8 bytes of the text these token ids stand for; None when the tokenizer is not known."""
        if self.tokenizer is None:
            return None
        return text_bytes(self.tokenizer, ids, self.byte_lengths)

    def _blocks(self, index: np.ndarray) -> torch.Tensor:
        """Blocks number `index` of the stream as a LongTensor (len(index), seq_len+1)."""
        rows = self.tokens[index[:, None] * self.block_len + np.arange(self.block_len)]
        return torch.from_numpy(rows.astype(np.int64))

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The train blocks (stream block numbers) in their order of `epoch`; the last two used are kept."""
        if (seed, epoch) not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs unless it exceeds an epoch
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([seed, epoch])
            self._perms[seed, epoch] = self.train_index[rng.permutation(self.num_train_blocks)]
        return self._perms[seed, epoch]

    def train_batch(self, step: int, batch_size: int, seed: int = 0, rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
        """This rank's rows of global batch `step`: LongTensor (batch_size // world_size, seq_len+1)."""
        if batch_size < 1 or step < 0:
            raise ValueError(f"need batch_size >= 1 and step >= 0, got batch_size={batch_size}, step={step}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} does not divide by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        per_rank = batch_size // world_size
        # global sample i -> epoch i // N, position i % N in that epoch's permutation
        sample = step * batch_size + rank * per_rank + np.arange(per_rank)
        epoch, pos = np.divmod(sample, self.num_train_blocks)
        index = np.empty(per_rank, dtype=np.int64)
        for e in np.unique(epoch):
            index[epoch == e] = self._permutation(seed, int(e))[pos[epoch == e]]
        return self._blocks(index)

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every validation block once, in order, as LongTensors of up to batch_size rows."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        val = self.val_index
        for start in range(0, len(val), batch_size):
            yield self._blocks(val[start:start + batch_size])

    def tokens_per_step(self, batch_size: int) -> int:
        """Target tokens in one global batch."""
        return batch_size * self.seq_len


def tokens_needed(train_blocks: int, seq_len: int, val_fraction: float = 0.05, val_split: str = "interleaved",
                  val_blocks: int = 1) -> int:
    """The fewest tokens whose blocks give at least `train_blocks` train and `val_blocks` validation blocks
    (what a streamed run of a known length reads: one epoch, no repeats)."""
    n = max(2, int(train_blocks / max(1e-9, 1 - val_fraction)))
    while True:
        held = len(validation_blocks(n, val_fraction, val_split))
        if n - held >= train_blocks and held >= val_blocks:
            return n * (seq_len + 1)
        n += max(1, (train_blocks - (n - held)) // 2, val_blocks - held)


def _hub_source(source: Any) -> str | None:
    """The Hub dataset name a source gives ("org/name" as a string or the one item of a list), or None."""
    if isinstance(source, (list, tuple)):
        names = [s for s in source if _is_hub_name(os.fspath(s))]
        if names and len(source) > 1:
            raise ValueError(f"--data {' '.join(map(str, source))}: a Hub dataset name ({names[0]!r}) must be "
                             "the only --data (local files and globs may be several)")
        return names[0] if names else None
    return str(source) if _is_hub_name(source) else None


def load_token_data(source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    seq_len: int = 256, cache_dir: str | os.PathLike | None = None,
                    val_fraction: float = 0.05, tokenizer: Any = None,
                    text_column: str = "text", *, val_split: str = "interleaved", data_config: str | None = None,
                    split: str = "train", streaming: bool = False, max_tokens: int | None = None) -> TokenData:
    """Load `source` as packed, cached token data.

    `source`: None (the bundled corpus), files, folders or globs (or a list of them), or one Hub dataset
    name "org/name" (also as the one item of a list), with `data_config` and `split`; `streaming` reads a
    Hub dataset row by row instead of downloading it whole. `max_tokens` keeps the first tokens only (and
    stops reading there). The tokens are cached per source, tokenizer, column, split and max_tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split {val_split!r} is not one of {VAL_SPLITS}")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    hub_name = _hub_source(source)
    if hub_name is not None:
        resolved: str | list[str] = hub_name
        identity: Any = {"hub": hub_name, "config": data_config, "split": split}
    else:
        resolved = resolve_files(BUNDLED_CORPUS if source is None else source)
        identity = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in resolved]
    name, vocab = _tokenizer_id(tokenizer)
    key = json.dumps([FORMAT_VERSION, identity, name, vocab, text_column, SEPARATOR, max_tokens])
    path = cache / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    tokens = _load_cached(path)
    if tokens is None:  # tokenize once; later calls with the same source and tokenizer reuse the file
        parts = _load_datasets(resolved, text_column, cache / "datasets", config=data_config, split=split,
                               streaming=streaming and hub_name is not None)
        tokens = _tokenize(parts, text_column, tokenizer, token_dtype(vocab), max_tokens, source=resolved)
        if len(tokens) == 0:
            raise ValueError(f"the corpus {source!r} is empty: no text in column {text_column!r}")
        _save_atomic(path, tokens)
        tokens = np.load(path, mmap_mode="r")
    return TokenData(tokens, seq_len, val_fraction, cache_path=path, val_split=val_split, tokenizer=tokenizer)


# ---- the data flags of the evaluation commands (`zoo train` makes its flags from TrainConfig) -------------

def add_data_flags(parser: Any, default_split: str = "interleaved") -> None:
    """--data, --data-config, --split, --streaming, --text-column, --val-fraction and --val-split."""
    parser.add_argument("--data", nargs="+", default=None,
                        help="text/JSONL/Parquet files, folders or globs, or one Hub dataset name org/name "
                             "(default: the bundled Jargon File)")
    parser.add_argument("--data-config", default=None, help="config (subset) of a Hub --data dataset")
    parser.add_argument("--split", default="train",
                        help="split of a Hub --data dataset whose held-out blocks are evaluated (default train)")
    parser.add_argument("--streaming", action="store_true",
                        help="stream a Hub --data dataset: read only the blocks evaluated (needs --max-batches)")
    parser.add_argument("--text-column", default="text", help="column (JSONL field) holding the text (default text)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of blocks held out for validation; must match the training run's (default 0.05)")
    parser.add_argument("--val-split", choices=VAL_SPLITS, default=default_split,
                        help="how the validation blocks were held out: interleaved (runs of this version) or "
                             f"tail (the last val-fraction of the corpus: older runs) (default {default_split})")


def data_options(args: Any) -> dict:
    """load_token_data's keywords from the flags of add_data_flags (the source is args.data)."""
    return {"text_column": args.text_column, "val_split": args.val_split, "data_config": args.data_config,
            "split": args.split, "streaming": args.streaming}
