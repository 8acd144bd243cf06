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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from zoo.tokenizer import ByteTokenizer

FORMAT_VERSION = 1  # bump when the cached token layout or the way documents are joined changes
BUNDLED_CORPUS = Path(__file__).parent / "corpus" / "jargon.txt.gz"
SEPARATOR = "\n\n"  # put between documents before packing
# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".txt.gz": "text", ".jsonl": "json", ".jsonl.gz": "json",
            ".json": "json", ".json.gz": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"^\w[\w.-]*/\w[\w.-]*(:[\w.-]+)?$")  # "org/name" or "org/name:config"
_PROGRESS_MIN_BYTES = 5_000_000  # show a progress bar only for inputs at least this large
TEXT_DTYPES = ("string", "large_string", "null")  # `datasets` dtypes of a text column (null: every row empty)


class DataFileError(ValueError):
    """A data file that cannot be read as text documents; the message names the file, the line and the field."""


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
    cls = type(tokenizer)
    name = getattr(tokenizer, "name_or_path", None) or f"{cls.__module__}.{cls.__qualname__}"
    vocab = max(int(tokenizer.vocab_size), len(tokenizer) if hasattr(tokenizer, "__len__") else 0)
    return name, vocab


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of a `vocab_size` vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _load_datasets(source: str | list[str], text_column: str, hf_cache: Path) -> list[Any]:
    """The source as `datasets.Dataset`s: one per builder (local files) or the Hub dataset's train split."""
    import datasets  # imported here: a warm cache never needs it, and it is slow to import

    if isinstance(source, str):  # a Hub dataset name
        name, _, config = source.partition(":")
        try:
            parts = [datasets.load_dataset(name, config or None, cache_dir=str(hf_cache))["train"]]
        except Exception as e:
            raise RuntimeError(
                f"could not load the Hub dataset {source!r} (it is not a local path either): {e!r}. "
                "Pass local .txt/.jsonl/.parquet files instead, or, if the dataset is already in the "
                "Hugging Face cache, set HF_HUB_OFFLINE=1.") from e
    else:
        groups: dict[str, list[str]] = {}
        for f in source:
            groups.setdefault(_builder(f), []).append(f)
        parts = [_load_files(datasets, b, fs, text_column, hf_cache) for b, fs in groups.items()]
    for part in parts:
        if text_column not in part.column_names:
            raise ValueError(f"no text column {text_column!r} in {source!r}; "
                             f"its columns are {part.column_names}")
        if getattr(part.features[text_column], "dtype", None) not in TEXT_DTYPES:
            raise DataFileError(f"{source!r}: column {text_column!r} holds {part.features[text_column]}, not text")
    return [part.select_columns([text_column]) for part in parts]


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
        part = datasets.load_dataset(builder, data_files=files, cache_dir=str(hf_cache),
                                     **({"sample_by": "document"} if builder == "text" else {}))["train"]
    except Exception as e:  # datasets wraps the reader's error: find the file and line ourselves
        raise find_problem(files, builder, text_column) or DataFileError(
            f"cannot read {', '.join(files)}: {_root_cause(e)}") from e
    finally:
        datasets_log.setLevel(level)
    feature = part.features.get(text_column)
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


def _tokenize(parts: list[Any], text_column: str, tokenizer: Any, dtype: np.dtype) -> np.ndarray:
    """One flat token array of all non-empty documents, joined by SEPARATOR."""
    sep = np.asarray(tokenizer.encode(SEPARATOR), dtype=dtype)
    pieces: list[np.ndarray] = []
    big = sum(part.data.nbytes for part in parts) >= _PROGRESS_MIN_BYTES
    with tqdm(total=sum(len(part) for part in parts), unit="doc", desc="tokenizing", disable=not big) as bar:
        for part in parts:
            for batch in part.iter(batch_size=1024):
                bar.update(len(batch[text_column]))
                texts = [t for t in batch[text_column] if t]
                if not texts:
                    continue
                if isinstance(tokenizer, ByteTokenizer):  # bytes are tokens: no Python work per token
                    ids = [np.frombuffer(SEPARATOR.join(texts).encode("utf-8"), np.uint8).astype(dtype)]
                else:
                    ids = [np.asarray(tokenizer.encode(t), dtype=dtype) for t in texts]
                for a in ids:
                    pieces += [sep, a] if pieces else [a]
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


class TokenData:
    """A token stream packed into blocks of seq_len+1 tokens: train blocks first, the last for validation."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float = 0.05,
                 cache_path: Path | None = None):
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
        self.num_val_blocks = max(1, int(num_blocks * val_fraction))
        self.num_train_blocks = num_blocks - self.num_val_blocks
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _blocks(self, index: np.ndarray) -> torch.Tensor:
        """Blocks number `index` of the stream as a LongTensor (len(index), seq_len+1)."""
        rows = self.tokens[index[:, None] * self.block_len + np.arange(self.block_len)]
        return torch.from_numpy(rows.astype(np.int64))

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The order of the train blocks in `epoch`; the last two used are kept."""
        if (seed, epoch) not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs unless it exceeds an epoch
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([seed, epoch])
            self._perms[seed, epoch] = rng.permutation(self.num_train_blocks)
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
        val = np.arange(self.num_train_blocks, self.num_train_blocks + self.num_val_blocks)
        for start in range(0, len(val), batch_size):
            yield self._blocks(val[start:start + batch_size])

    def tokens_per_step(self, batch_size: int) -> int:
        """Target tokens in one global batch."""
        return batch_size * self.seq_len


def load_token_data(source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    seq_len: int = 256, cache_dir: str | os.PathLike | None = None,
                    val_fraction: float = 0.05, tokenizer: Any = None,
                    text_column: str = "text") -> TokenData:
    """Load `source` (None: the bundled corpus; files, globs or a Hub name) as packed, cached token data."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_hub_name(source):
        resolved: str | list[str] = str(source)
        identity: Any = {"hub": resolved}
    else:
        resolved = resolve_files(BUNDLED_CORPUS if source is None else source)
        identity = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in resolved]
    name, vocab = _tokenizer_id(tokenizer)
    key = json.dumps([FORMAT_VERSION, identity, name, vocab, text_column, SEPARATOR])
    path = cache / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    tokens = _load_cached(path)
    if tokens is None:  # tokenize once; later calls with the same source and tokenizer reuse the file
        parts = _load_datasets(resolved, text_column, cache / "datasets")
        tokens = _tokenize(parts, text_column, tokenizer, token_dtype(vocab))
        if len(tokens) == 0:
            raise ValueError(f"the corpus {source!r} is empty: no text in column {text_column!r}")
        _save_atomic(path, tokens)
        tokens = np.load(path, mmap_mode="r")
    return TokenData(tokens, seq_len, val_fraction, cache_path=path)
