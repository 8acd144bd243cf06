"""Tools a transformers user reaches for, on the zoo LM, with transformers' own Llama (same weights) as the
oracle: PEFT LoRA adapters and the HF Trainer with gradient checkpointing."""

import pytest
import torch

import zoo
from zoo.interop import to_transformers


def twins():
    torch.manual_seed(0)
    ours = zoo.load("lm-dense-tiny", n_layers=2, n_kv_heads=2, max_seq_len=64)
    return ours, to_transformers(ours).train()


def test_peft_lora_on_the_zoo_lm_trains_as_on_llama():
    peft = pytest.importorskip("peft")
    ours, theirs = twins()
    x = torch.randint(0, 256, (2, 16))
    losses, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(1)  # the same LoRA init
        lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        trainable = {n.split("base_model.model.")[-1]: p for n, p in lora.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        with torch.no_grad():  # B starts at zero: give it values so the adapter changes the function
            for i, (n, p) in enumerate(trainable.items()):  # the same order in both: per layer q then v
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        out = lora(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad.norm().item() for p in trainable.values()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert grads[0] == pytest.approx(grads[1], rel=1e-4)


def test_hf_trainer_with_gradient_checkpointing_gives_llamas_losses(tmp_path):
    from transformers import Trainer, TrainingArguments

    ours, theirs = twins()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (8, 16))]
    logs = []
    for name, model in (("zoo", ours), ("llama", theirs)):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-3, logging_steps=1, gradient_checkpointing=True, report_to=[],
                                 save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                                 lr_scheduler_type="constant", warmup_steps=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        assert model.is_gradient_checkpointing
        logs.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
    assert len(logs[0]) == 3
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
