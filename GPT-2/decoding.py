"""Beam-search decoding of E2E MRs (paper: beam 10, length penalty 0.8, no-repeat 4-grams, <= 64 new tokens)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from e2e_data import prompt_text


@torch.no_grad()
def beam_decode(model: torch.nn.Module, tokenizer: Any, mrs: Sequence[str], *, num_beams: int,
                length_penalty: float, no_repeat_ngram_size: int, max_new_tokens: int, batch_size: int,
                desc: str = "decode") -> list[str]:
    """One output per MR: batched, left-padded beam search; the text after the prompt up to eos, stripped."""
    if num_beams < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"decode needs num_beams, batch_size, max_new_tokens >= 1, got "
                         f"{num_beams}, {batch_size}, {max_new_tokens}")
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(mrs), batch_size), desc=desc, unit="batch"):
            prompts = [prompt_text(mr) for mr in mrs[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(
                **enc, num_beams=num_beams, length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens, do_sample=False,
                early_stopping=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.extend(" ".join(t.split()) for t in texts)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
