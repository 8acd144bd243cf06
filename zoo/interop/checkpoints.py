"""transformers checkpoints in, zoo LMs out, and back: `import_checkpoint`, `to_transformers`, `export_checkpoint`.

Import reads a transformers folder with transformers' own loader (`trust_remote_code=False`: only the
architectures transformers ships, no code from the checkpoint runs), maps its weights onto a zoo LM
of the same function (zoo/interop/architectures.py) and frees the transformers model; the zoo model
shares the tensors, so the peak is about one copy plus the largest fused tensor split.
Export builds the transformers model of a zoo LM with the same weights and saves it with
`save_pretrained`: a folder that transformers alone loads.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from models.lm import ZooLMConfig, ZooLMForCausalLM, drawn_buffers
from models.sae import SAEConfig
from zoo.hub import TOKENIZER_FILES
from zoo.interop.architectures import ARCHITECTURES, architecture, export_architecture, hf_state, zoo_state


def transformers_model_type(folder: Path) -> str | None:
    """The model_type of folder/config.json when it names a transformers architecture (not a zoo type)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    zoo_types = {ZooLMConfig.model_type, SAEConfig.model_type}
    return model_type if isinstance(model_type, str) and model_type not in zoo_types else None


def zoo_config_of(hf_config, **overrides) -> tuple[ZooLMConfig, dict]:
    """The zoo config computing what a transformers config computes, with overrides applied; and the fields."""
    arch = architecture(hf_config.model_type)
    fields = arch.zoo_fields(hf_config)
    from zoo.loading import make_config

    return make_config(ZooLMConfig, fields, overrides, where=f"a {arch.config_class}"), fields


def describe_import(folder: str | Path) -> dict | None:
    """What importing a transformers folder maps: its architecture and the zoo fields it becomes (None when
    the folder is not a transformers checkpoint)."""
    from transformers import AutoConfig

    model_type = transformers_model_type(Path(folder))
    if model_type is None:
        return None
    arch = architecture(model_type)
    fields = arch.zoo_fields(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    return {"architecture": model_type, "transformers_class": arch.model_class, "zoo_fields": fields}


@torch.no_grad()
def from_transformers_model(hf_model, *, dtype: torch.dtype | None = None, **overrides) -> ZooLMForCausalLM:
    """A zoo LM with the weights of a live transformers causal LM (same logits at the same settings)."""
    config, fields = zoo_config_of(hf_model.config, **overrides)
    return _build(config, hf_model.state_dict(), hf_model.config, dtype, fields)


def _build(config: ZooLMConfig, state: dict, hf_config, dtype, fields: dict) -> ZooLMForCausalLM:
    arch = architecture(hf_config.model_type)
    rules = arch.tensors(config)
    covered = {n for rule in rules for n in rule.hf}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = sorted(set(state) - covered - tied)
    if left:
        raise ValueError(f"the {arch.model_class} weights hold tensors the zoo mapping does not read: {left[:6]} "
                         f"(a setting of this checkpoint the zoo does not support)")
    mapped = zoo_state(rules, state)
    with torch.device("meta"):
        model = ZooLMForCausalLM(config)
    expected = model.state_dict()
    drawable = drawn_buffers(model)
    missing = sorted(set(expected) - set(mapped) - drawable - tied)
    wrong = sorted(k for k, v in mapped.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape))
    unexpected = sorted(set(mapped) - set(expected))
    router = (fields.get("mlp_kwargs") or {}).get("router", "softmax_topk")
    if config.mlp == "moe" and config.mlp_kwargs.get("router", "softmax_topk") != router:
        # another router than the checkpoint's (e.g. top-p on DeepSeek): its own tensors (the sigmoid router's
        # correction bias) have no place; the projection is kept
        dropped = [k for k in unexpected if ".mlp.router." in k and not k.endswith(".router.proj.weight")]
        if dropped:
            warnings.warn(f"router {config.mlp_kwargs.get('router')!r} replaces {router!r}: the checkpoint's "
                          f"{sorted({k.rsplit('.', 1)[-1] for k in dropped})} are not used", stacklevel=3)
        unexpected = [k for k in unexpected if k not in dropped]
        mapped = {k: v for k, v in mapped.items() if k not in dropped}
    if missing or wrong or unexpected:
        detail = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4]]
        raise ValueError(f"the {arch.model_class} weights do not fit the zoo config (with its overrides): missing "
                         f"{missing[:6]}, unexpected {unexpected[:6]}, wrong shapes {detail}")
    target = dtype or next(iter(mapped.values())).dtype
    model.load_state_dict({k: v.to(target).contiguous() for k, v in mapped.items()}, strict=False, assign=True)
    _materialise(model, target)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _materialise(model: ZooLMForCausalLM, dtype: torch.dtype) -> None:
    """Give the tensors no checkpoint holds (rotary frequencies, drawn projections) real storage and values."""
    for module in model.modules():
        _fill_meta(module, model._init_weights)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype and name != "inv_freq":
                setattr(module, name, buf.to(dtype))


def _fill_meta(module: nn.Module, init) -> None:
    """If the module's own tensors include meta ones: storage for them and `init(module)`'s values, keeping the
    tensors that were already loaded (init may re-draw those: they are put back)."""
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    if not any(t.is_meta for _, t in own):
        return
    loaded = {name: t.detach().clone() for name, t in own if not t.is_meta}
    module.to_empty(device="cpu", recurse=False)  # (this empties the loaded tensors too)
    init(module)
    params = dict(module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, value in loaded.items():
            (params[name] if name in params else module.get_buffer(name)).copy_(value)


def import_checkpoint(folder: str | Path, *, dtype: torch.dtype | None = None, **overrides) -> ZooLMForCausalLM:
    """A transformers checkpoint folder -> a zoo LM with the same logits (overrides change zoo config fields)."""

    folder = Path(folder)
    model_type = transformers_model_type(folder)
    try:
        return _import(folder, model_type, dtype or torch.float32, overrides)
    except ValueError as err:
        if str(folder) in str(err):
            raise
        raise ValueError(f"{folder}: {err}") from err


def _import(folder: Path, model_type: str, dtype: torch.dtype, overrides: dict) -> ZooLMForCausalLM:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    architecture(model_type)  # a clear error for an unsupported architecture before anything is read
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as err:
        raise ValueError(f"{folder / 'config.json'} is not a valid transformers {model_type!r} config: "
                         f"{type(err).__name__}: {err}") from err
    config, fields = zoo_config_of(hf_config, **overrides)  # refuse unsupported settings before reading weights
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=dtype,
                                                              output_loading_info=True)
    except (OSError, RuntimeError, SafetensorError, KeyError) as err:
        raise ValueError(f"transformers could not read the weights: {type(err).__name__}: {err}") from err
    # transformers fills missing weights with random values and warns; an import must not.
    problems = {k: sorted(v)[:6] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                         "mismatched_keys", "error_msgs")}
    if problems:
        raise ValueError(f"the weights do not match config.json: {problems}")
    state = hf_model.state_dict()
    del hf_model
    return _build(config, state, hf_config, dtype, fields)


@torch.no_grad()
def to_transformers(model: ZooLMForCausalLM, architecture_name: str | None = None,
                    attn_implementation: str = "sdpa"):
    """The transformers model (Llama, Qwen2, ..., Mixtral, OLMoE) with the zoo LM's weights, in eval mode.

    `architecture_name` (a transformers model_type) picks the target; by default the first that holds the
    model (dense -> Llama, MoE -> Mixtral when they can). A kind with no equivalent is a ValueError naming it.
    """
    import transformers

    arch = export_architecture(model.config, architecture_name)
    config = arch.hf_config(model.config)
    config._attn_implementation = attn_implementation
    cls = getattr(transformers, arch.model_class)
    state = hf_state(arch.tensors(model.config), dict(model.state_dict()))
    with torch.device("meta"):
        target = cls(config)
    missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping to {cls.__name__} is incomplete: missing {missing}, unexpected {unexpected}")
    for module in target.modules():  # buffers no checkpoint holds (rotary frequencies, scales): transformers'
        _fill_meta(module, target._init_weights)  # own initialisation computes them
    if config.tie_word_embeddings:
        target.tie_weights()
    return target.to(model.embed.weight.device).eval()


def transformers_config(config: ZooLMConfig, architecture_name: str | None = None):
    """The transformers config of a zoo LM config (a ValueError for kinds transformers lacks)."""
    return export_architecture(config, architecture_name).hf_config(config)


def export_checkpoint(model: ZooLMForCausalLM, out: str | Path, *, architecture_name: str | None = None,
                      tokenizer_from: str | Path | None = None) -> dict:
    """Save the zoo LM as a transformers checkpoint folder (loadable without the zoo); returns what mapped."""
    out = Path(out)
    hf = to_transformers(model, architecture_name, attn_implementation="sdpa")
    hf.save_pretrained(out)
    copied = []
    if tokenizer_from is not None and Path(tokenizer_from).is_dir():
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file():
                shutil.copy2(source, out / name)
                copied.append(name)
    return {"architecture": hf.config.model_type, "transformers_class": type(hf).__name__, "out": str(out),
            "tokenizer_files": copied}


__all__ = ["ARCHITECTURES", "describe_import", "export_checkpoint", "from_transformers_model",
           "import_checkpoint", "to_transformers", "transformers_config", "transformers_model_type"]
