"""Text in, text out: generation with a zoo LM and its tokenizer (the byte tokenizer unless told)."""

from __future__ import annotations

import torch

from zoo.tokenizer import ByteTokenizer, check_vocab, decode, encode


def generate_text(model, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, greedy: bool = False, seed: int | None = 0, tokenizer=None) -> str:
    """The prompt followed by `max_new_tokens` generated tokens, decoded (greedy or sampled).

    `tokenizer`: the model's (zoo.tokenizer.load_tokenizer of its source); default ByteTokenizer. Special
    tokens (a BOS the tokenizer adds, an EOS generated) are left out of the text.
    """
    if not prompt:
        raise ValueError("prompt must not be empty (the model needs at least one token to continue)")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    check_vocab(model.config.vocab_size, tok, "generate")
    ids = torch.tensor([encode(tok, prompt)], device=next(model.parameters()).device)
    room = model.config.max_seq_len - ids.shape[1]
    if room <= 0:
        raise ValueError(f"the prompt is {ids.shape[1]} tokens; the model's context is {model.config.max_seq_len}")
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": top_k}
    pad = next((i for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                if i is not None), 0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=min(max_new_tokens, room),
                         pad_token_id=pad, **kwargs)
    return decode(tok, out[0])
