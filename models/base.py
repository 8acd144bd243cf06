"""What every zoo model shares on top of transformers' PreTrainedModel: a model card on save."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from models.card import render_model_card


class ZooPreTrainedModel(PreTrainedModel):
    """PreTrainedModel whose save_pretrained also writes README.md, the model card."""

    def cost(self, seq_len: int | None = None) -> dict:
        """total_params, active_params (per token), flops_per_token (forward), seq_len."""
        raise NotImplementedError

    def save_pretrained(self, save_directory, *args, training: dict | None = None, **kwargs):
        """Write config.json + model.safetensors (never pickle) + README.md with `training` facts."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, *args, **kwargs)
        card = render_model_card(self.config, self.cost(), training)
        (Path(save_directory) / "README.md").write_text(card, encoding="utf-8")
