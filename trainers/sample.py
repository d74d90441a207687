"""Sample text from a trained model: a run or checkpoint directory, or a HuggingFace directory (an export).

Generation is transformers' (`generate`, with its KV cache) on the LlamaForCausalLM that holds the checkpoint's
weights, so a checkpoint and its export sample the same text for the same seed. The prompt follows EOS, which is
how the model saw the start of every document it trained on (the packer puts EOS between documents).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainers.export import (MODEL_CARD, TOKENIZER_FILE, card_tokenizer, read_checkpoint_model, read_model_card,
                             resolve_checkpoint)
from trainers.tokenizer import HFTokenizer
from trainers.tokenizer import Tokenizer as AnyTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_for_sampling(source: str | Path) -> tuple[PreTrainedModel, AnyTokenizer]:
    """(LlamaForCausalLM in eval mode on the CPU, the run's tokenizer) of `source`: a directory with a config.json
    is read as a HuggingFace one, anything else as a run or checkpoint directory (see resolve_checkpoint)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from trainers.hf import hf_name, to_hf_config

    path = Path(source)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        if (path / MODEL_CARD).is_file():
            tokenizer = card_tokenizer(path, read_model_card(path))
        elif (path / TOKENIZER_FILE).is_file():
            tokenizer = HFTokenizer(path / TOKENIZER_FILE)
        else:
            raise FileNotFoundError(f"{path}: a HuggingFace directory without {TOKENIZER_FILE}: nothing to encode the "
                                    "prompt with")
        return model.eval(), tokenizer
    checkpoint = resolve_checkpoint(path)
    state, cfg, card = read_checkpoint_model(checkpoint)
    model = LlamaForCausalLM(to_hf_config(cfg))
    model.load_state_dict({hf_name(name): tensor for name, tensor in state.items()})
    return model.eval(), card_tokenizer(checkpoint, card)


def sample(source: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 0, device: str = "cpu") -> str:
    """The text `source`'s model writes after `prompt` (without the prompt), up to max_new_tokens tokens or EOS.

    temperature 0 is greedy decoding; top_k keeps only the k likeliest tokens at each step (None: all). The same
    seed gives the same text on the same device; the caller's RNG state is left as it was. Ids past the
    tokenizer's vocabulary (an embedding rounded up) are never sampled."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: must be at least 0 (0 is greedy decoding)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k = {top_k}: must be at least 1, or None for every token")
    model, tokenizer = load_for_sampling(source)
    return generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed, device)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: AnyTokenizer, prompt: str, max_new_tokens: int, temperature: float,
             top_k: int | None, seed: int, device: str) -> str:
    """sample()'s generation on a loaded LlamaForCausalLM and the tokenizer it was trained with."""
    if tokenizer.eos_id >= model.config.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size} ids) does not reach its tokenizer's EOS "
                         f"({tokenizer.eos_id}): it was trained on token ids below that (synthetic data), not on text")
    ids = [tokenizer.eos_id, *map(int, tokenizer.encode(prompt))]
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"the prompt's {len(ids) - 1} tokens + EOS + max_new_tokens = {max_new_tokens} exceed the "
                         f"model's {limit} positions (model.max_seq_len): shorten the prompt or ask for fewer tokens")
    model = model.to(device)
    tokens = torch.tensor([ids], device=device)
    never = list(range(tokenizer.vocab_size, model.config.vocab_size)) or None
    sampling = {"do_sample": False}
    if temperature:  # top_k 0, not None: None would fall back to transformers' default of 50
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0}
    with torch.random.fork_rng(devices=None if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id, suppress_tokens=never,
                             **sampling)
    new = out[0, len(ids):].tolist()
    if new and new[-1] == tokenizer.eos_id:
        new.pop()
    return tokenizer.decode(new)
