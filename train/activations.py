"""LM activations for sparse autoencoders: read them through forward hooks, store them on disk.

`hook_point` names a module of the LM (`model.get_submodule`): "blocks.2" is the residual stream
after block 2 of a zoo LM, "blocks.2.mlp" its MLP output, "blocks.2.attn" its attention output,
"blocks.2:input" the residual stream entering block 2; for a transformers causal LM use its own
names ("transformer.h.3", "model.layers.3.mlp", ...). A tuple output contributes its first element.

`harvest` runs the LM over token blocks, stops each forward at the hook, and streams the
activations through a shuffle buffer into a memory-mapped .npy file, so the number of
activations is limited by disk, not RAM. `ActivationStore` reads it back: the batch of step s is
a pure function of (seed, s), read as one contiguous slice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from train.data import default_cache_dir

FORMAT_VERSION = 1
DATA_FILE, META_FILE = "activations.npy", "meta.json"
DEFAULT_SHUFFLE_ROWS = 1 << 17  # rows mixed at a time while writing (at d 256, fp16: 64 MiB)
_PROGRESS_MIN_ROWS = 100_000  # show a progress bar only for harvests at least this large


class _StopForward(Exception):
    """Raised by the capture hook once the activation is in hand: the rest of the LM need not run."""


def _module(model: nn.Module, hook_point: str) -> tuple[nn.Module, bool]:
    """The module a hook point names, and whether the point is its input (else its output)."""
    if hasattr(model, "blocks") and hasattr(model, "lm_head"):  # a zoo LM: transformers / TransformerLens names too
        from zoo.interop.hook_points import zoo_hook_point

        hook_point = zoo_hook_point(hook_point)
    name, _, where = hook_point.partition(":")
    if where not in ("", "input", "output"):
        raise ValueError(f"hook point {hook_point!r}: the part after ':' must be 'input' or 'output'")
    try:
        return model.get_submodule(name), where == "input"
    except AttributeError as err:
        blocks = [n for n, _ in model.named_modules() if n.count(".") <= 2 and n][:24]
        raise ValueError(f"hook point {hook_point!r}: {type(model).__name__} has no module {name!r}; "
                         f"some of its modules: {blocks}") from err


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value, new):
    return (new, *value[1:]) if isinstance(value, (tuple, list)) else new


def _input_key(args: tuple, kwargs: dict) -> int | str:
    """Where a module's main input sits: the first positional argument, else the first tensor keyword."""
    if args:
        return 0
    return next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))


def _hook(module: nn.Module, at_input: bool, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register fn on the module's input or output; a tensor that fn returns replaces the activation."""
    if at_input:
        def pre_hook(m, args, kwargs):
            key = _input_key(args, kwargs)
            new = fn(args[key] if isinstance(key, int) else kwargs[key])
            if new is None:
                return None
            if isinstance(key, int):
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(m, args, out):
        new = fn(_first(out))
        return None if new is None else _replace_first(out, new)
    return module.register_forward_hook(hook)


@contextlib.contextmanager
def edit_activation(model: nn.Module, hook_point: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, the LM's activation at hook_point is replaced by fn(activation) (e.g. an SAE's x_hat)."""
    handle = _hook(*_module(model, hook_point), fn)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def lm_activations(model: nn.Module, input_ids: torch.Tensor, hook_point: str) -> torch.Tensor:
    """(batch, seq, d) activation at hook_point for (batch, seq) token ids; the LM stops right after it."""
    found: list[torch.Tensor] = []

    def grab(activation: torch.Tensor) -> None:
        found.append(activation.detach())
        raise _StopForward

    handle = _hook(*_module(model, hook_point), grab)
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not found:
        raise ValueError(f"hook point {hook_point!r} was not reached by the forward pass")
    return found[0]


class ActivationStore:
    """Activations on disk: `activations.npy` (rows, d), memory-mapped, and `meta.json` describing them."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.data = np.load(self.folder / DATA_FILE, mmap_mode="r")
        self.rows, self.d = self.data.shape

    @property
    def act_scale(self) -> float:
        """Multiplier that gives these activations unit mean squared norm."""
        return float(self.meta["mean_sq_norm"]) ** -0.5

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop as a float32 tensor."""
        return torch.from_numpy(np.array(self.data[start:stop], dtype=np.float32))

    def batch(self, step: int, batch_rows: int, seed: int = 0, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's share of global batch `step`: (batch_rows // world, d) float32.

        The store is cut into chunks of batch_rows rows; each epoch visits them in an order drawn from
        (seed, epoch), so the batch is a pure function of (seed, step) and one contiguous read.
        """
        chunks = self.rows // batch_rows
        if chunks == 0:
            raise ValueError(f"the activation store {self.folder} holds {self.rows} rows, fewer than one "
                             f"batch of {batch_rows}")
        if batch_rows % world:
            raise ValueError(f"batch of {batch_rows} rows does not divide across {world} ranks")
        epoch, pos = divmod(step, chunks)
        chunk = int(np.random.default_rng([seed, epoch]).permutation(chunks)[pos])
        per_rank = batch_rows // world
        start = chunk * batch_rows + rank * per_rank
        return self.slice(start, start + per_rank)

    def batches(self, batch_rows: int, max_rows: int = 0) -> Iterator[torch.Tensor]:
        """Every row (or the first max_rows) once, in order, in float32 batches of up to batch_rows."""
        end = min(self.rows, max_rows) if max_rows else self.rows
        for start in range(0, end, batch_rows):
            yield self.slice(start, min(start + batch_rows, end))


@torch.no_grad()
def harvest(model: nn.Module, hook_point: str, token_batches: Iterable[torch.Tensor], rows: int,
            folder: str | os.PathLike, *, dtype: str = "float16", shuffle_rows: int = DEFAULT_SHUFFLE_ROWS,
            seed: int = 0, meta: dict | None = None) -> ActivationStore:
    """Write `rows` activations of `model` at `hook_point` over (batch, seq) token batches to `folder`.

    Rows pass through a shuffle buffer of `shuffle_rows`: when it is full, a random half is written
    out, so consecutive rows on disk come from different sequences. The folder appears atomically
    (written under a temporary name, then renamed) and is returned as an ActivationStore.
    """
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    out = written = None
    buffer, filled, sq_norm = None, 0, 0.0
    bar = tqdm(total=rows, unit="act", unit_scale=True, desc=f"harvesting {hook_point}",
               disable=rows < _PROGRESS_MIN_ROWS)
    try:
        for ids in token_batches:
            if written is not None and written + filled >= rows:
                break
            acts = lm_activations(model, ids.to(device), hook_point)  # (batch, seq, d)
            acts = acts.reshape(-1, acts.shape[-1]).float().cpu().numpy()
            if out is None:
                out = np.lib.format.open_memmap(tmp / DATA_FILE, mode="w+", dtype=dtype, shape=(rows, acts.shape[1]))
                buffer, written = np.empty((max(shuffle_rows, 2), acts.shape[1]), dtype=dtype), 0
            acts = acts[: rows - written - filled]
            bar.update(len(acts))
            sq_norm += float(np.square(acts, dtype=np.float64).sum())
            while len(acts):
                take = min(len(acts), len(buffer) - filled)
                buffer[filled:filled + take], acts, filled = acts[:take], acts[take:], filled + take
                if filled == len(buffer):  # write a random half, keep the other half mixing
                    buffer[:] = buffer[rng.permutation(filled)]
                    half = filled // 2
                    out[written:written + half], written = buffer[:half], written + half
                    buffer[:filled - half], filled = buffer[half:filled].copy(), filled - half
        if out is None or written + filled < rows:
            raise ValueError(f"the token batches gave {0 if out is None else written + filled} activations, "
                             f"fewer than the {rows} asked for")
        out[written:written + filled] = buffer[rng.permutation(filled)]
        out.flush()
        del out
        info = {"format_version": FORMAT_VERSION, "rows": rows, "d": int(buffer.shape[1]), "dtype": dtype,
                "hook_point": hook_point, "mean_sq_norm": sq_norm / rows, **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same store first: use theirs
            if not (folder / META_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ActivationStore(folder)


def store_folder(key: dict) -> Path:
    """`$ZOO_CACHE/activations/<hash of key>`: the cache folder of the store that `key` describes."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, key], sort_keys=True).encode()).hexdigest()[:20]
    return default_cache_dir().parent / "activations" / f"acts-{digest}"


def cached_harvest(model: nn.Module, hook_point: str, identity: dict,
                   token_batches: Callable[[], Iterable[torch.Tensor]], rows: int, *, dtype: str = "float16",
                   shuffle_rows: int = DEFAULT_SHUFFLE_ROWS, seed: int = 0) -> ActivationStore:
    """The store of `rows` activations at hook_point from the cache, harvested first if needed.

    `identity` says what the activations are (source LM, corpus, split, ...): together with the other
    arguments it names the cache folder. Under torchrun only rank 0 harvests; the others wait.
    """
    import torch.distributed as dist

    key = {**identity, "hook_point": hook_point, "rows": rows, "dtype": dtype, "shuffle_rows": shuffle_rows,
           "seed": seed}
    folder = store_folder(key)
    distributed = dist.is_available() and dist.is_initialized()
    if not (folder / META_FILE).is_file() and (not distributed or dist.get_rank() == 0):
        folder.parent.mkdir(parents=True, exist_ok=True)
        harvest(model, hook_point, token_batches(), rows, folder, dtype=dtype, shuffle_rows=shuffle_rows,
                seed=seed, meta={"key": key})
    if distributed:
        dist.barrier()
    return ActivationStore(folder)


def _weights_identity(folder: Path) -> list:
    """Name, size and mtime of the weight and config files of a checkpoint folder: a changed file is a new LM."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _transformers_lm(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)


def load_source_lm(source: str, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenizer, identity) of the LM an SAE reads: a zoo LM folder, catalog name (fresh weights drawn
    from `seed`) or Hub repo id, or any transformers causal LM (folder or repo id); identity names its weights.
    The tokenizer is the model's own (zoo.tokenizer.load_tokenizer: the byte tokenizer for a catalog name or a
    zoo checkpoint that carries none), checked to give no id beyond the model's vocabulary."""
    from zoo import hub
    from zoo.catalog import CATALOG, FAMILIES
    from zoo.interop import ARCHITECTURES
    from zoo.loading import load
    from zoo.tokenizer import check_vocab, load_tokenizer

    zoo_types = {config_cls.model_type for config_cls, _ in FAMILIES.values()}
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        identity = f"folder:{path.resolve()}:{_weights_identity(path)}"
        # a transformers checkpoint of an architecture the zoo imports becomes a zoo LM (same function); others
        # are read by transformers itself
        model = load(path) if model_type in zoo_types or model_type in ARCHITECTURES else _transformers_lm(str(path))
    elif source in CATALOG:
        with torch.random.fork_rng(devices=[]):  # fresh weights from `seed`, the caller's RNG untouched
            torch.manual_seed(seed)
            model = load(source)
        identity = f"catalog:{source}:fresh-weights-seed-{seed}"
    elif hub.is_repo_id(source):
        try:
            model = load(source)
        except ValueError:  # not a zoo checkpoint: any transformers causal LM
            model = _transformers_lm(source)
        identity = f"hub:{source}"
    else:
        raise ValueError(f"source_model {source!r} is not a checkpoint folder, a catalog name or a Hub repo id; "
                         f"train the LM first (e.g. `zoo train lm-dense-tiny` writes runs/lm-dense-tiny/final) "
                         f"or point the SAE at one with --set source_model=FOLDER")
    if getattr(model.config, "model_type", None) in zoo_types - {"zoo_lm"}:
        raise ValueError(f"source_model {source!r} is a {model.config.model_type} checkpoint, not a language model")
    tokenizer = load_tokenizer(source)
    check_vocab(model.config.vocab_size, tokenizer, f"source_model {source!r}")
    return model.to(device).eval(), tokenizer, identity
