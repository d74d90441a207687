"""Interop with transformers' LlamaForCausalLM: configs and weights, both ways.

Our Transformer has HF Llama's shapes and rotary layout (rotate_half over the two halves of the head dim),
so weights convert by renaming alone, no permutation:

    tok_embeddings.weight                 model.embed_tokens.weight
    layers.{i}.attention.wq.weight        model.layers.{i}.self_attn.q_proj.weight   (and wk, wv, wo)
    layers.{i}.feed_forward.w1.weight     model.layers.{i}.mlp.gate_proj.weight      (w3 up, w2 down)
    layers.{i}.attention_norm.weight      model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    norm.weight / output.weight           model.norm.weight / lm_head.weight

Written against transformers 5 (`config.rope_parameters`; version 4 kept rope_theta and rope_scaling apart).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from torch.distributed.tensor import DTensor

from trainers.config import ModelConfig
from trainers.model import Transformer, build_model

if TYPE_CHECKING:  # transformers is imported where it is used: a trainer that only maps names never loads it
    from transformers import LlamaConfig, LlamaForCausalLM

_BLOCK_NAMES = {  # inside layers.{i}: ours -> HF's
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    """Our state-dict key -> HF's, e.g. 'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("layers."):
        _, index, sub = module.split(".", 2)
        return f"model.layers.{index}.{_BLOCK_NAMES[sub]}.{leaf}"
    return f"{_TOP_NAMES[module]}.{leaf}"


def to_hf_config(cfg: ModelConfig) -> LlamaConfig:
    """The LlamaConfig of the same network. dropout_embed and dropout_resid have no HF counterpart and are
    left out: they act only in training, so inference is unchanged. Token ids (bos, eos, pad) are the
    tokenizer's business and left unset."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg.dropout_attn,
        bos_token_id=None,
        eos_token_id=None,
    )


def from_hf_config(hf: LlamaConfig) -> ModelConfig:
    """The ModelConfig of an HF Llama; ValueError listing every feature our Transformer cannot represent."""
    rope = dict(hf.rope_parameters or {})
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r} (only 'silu': SwiGLU)")
    if hf.attention_bias:
        problems.append("attention_bias=True (our projections have no bias)")
    if hf.mlp_bias:
        problems.append("mlp_bias=True (our MLP has no bias)")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters={rope} (only plain RoPE: rope_type 'default', no scaling)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (we rotate the whole head dim)")
    if hf.head_dim != hf.hidden_size // hf.num_attention_heads:
        problems.append(f"head_dim={hf.head_dim} != hidden_size / num_attention_heads = "
                        f"{hf.hidden_size // hf.num_attention_heads} (ours is always the quotient)")
    if problems:
        raise ValueError("this Llama config cannot be represented by trainers.model.Transformer: " + "; ".join(problems))

    cfg = ModelConfig(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        # None where HF's value is our default, so to_hf_config -> from_hf_config gives back an equal config
        n_kv_heads=None if hf.num_key_value_heads == hf.num_attention_heads else hf.num_key_value_heads,
        rope_theta=rope["rope_theta"],
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=hf.max_position_embeddings,
        init_std=hf.initializer_range,
        dropout_attn=hf.attention_dropout,
    )
    if cfg.hidden_dim != hf.intermediate_size:  # not Llama's 8/3 rule: spell it out
        cfg.ffn_dim = hf.intermediate_size
    return cfg


def from_hf(model_or_path: LlamaForCausalLM | str | os.PathLike) -> tuple[Transformer, ModelConfig]:
    """Our Transformer (float32, CPU) with the weights of an HF Llama: an instance, or a local directory
    written by `save_pretrained` (never downloaded)."""
    from transformers import LlamaForCausalLM

    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a local directory written by save_pretrained (no config.json); "
                             "from_hf never downloads")
        hf = LlamaForCausalLM.from_pretrained(path, local_files_only=True)
    elif isinstance(model_or_path, LlamaForCausalLM):
        hf = model_or_path
    else:
        raise TypeError(f"from_hf takes a LlamaForCausalLM or a directory path, not {type(model_or_path).__name__}")

    cfg = from_hf_config(hf.config)
    # meta then to_empty: HF's weights overwrite every parameter, so a random init would be wasted work
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    model.reset_rope()
    hf_state = hf.state_dict()
    ours = {name: hf_name(name) for name in model.state_dict()}
    unexpected = sorted(set(hf_state) - set(ours.values()))
    if unexpected:
        raise ValueError(f"the HF model has weights our Transformer has no place for: {unexpected[:5]}")
    model.load_state_dict({name: hf_state[key] for name, key in ours.items()})
    return model, cfg


def to_hf(model: Transformer, cfg: ModelConfig) -> LlamaForCausalLM:
    """An HF LlamaForCausalLM (float32, eval mode) holding a copy of `model`'s weights. `model` must be
    unsharded: gather a sharded one first, e.g. with torch.distributed.checkpoint.state_dict's
    get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))."""
    state = model.state_dict()
    sharded = [name for name, t in state.items() if isinstance(t, DTensor)]
    if sharded:
        raise ValueError(f"to_hf needs an unsharded model, but {sharded[0]} is a DTensor: gather the full "
                         "state dict first and load it into a model built on one device")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(to_hf_config(cfg))
    hf.load_state_dict({hf_name(name): t for name, t in state.items()})
    return hf.eval()
