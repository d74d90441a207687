"""Interop with transformers' LlamaForCausalLM: logits parity both ways, save/load, refusals."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.config import ModelConfig
from trainers.hf import from_hf, from_hf_config, to_hf, to_hf_config
from trainers.model import build_model, init_weights

# (vocab, hidden, layers, heads, kv heads, intermediate, tied, rope theta): MHA, GQA, MQA; odd vocabularies
HF_SHAPES = [
    (97, 32, 2, 4, 4, 64, False, 10000.0),
    (101, 48, 3, 6, 2, 80, True, 500000.0),
    (64, 64, 2, 4, 1, 96, False, 10000.0),
    (257, 40, 2, 2, 2, 112, True, 1000.0),  # head_dim 20; 112 is Llama's 8/3 rule for 40
]


def hf_llama(vocab, hidden, layers, heads, kv, inter, tied, theta, seed=0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=tied, rope_theta=theta,
        rms_norm_eps=1e-6, max_position_embeddings=64, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    # HF's init (std 0.02, unit norms) gives logits ~1e-2, where a 1e-4 tolerance would hide a wrong mapping:
    # draw weights that give O(1) logits, and norm gains that are not all 1 so swapped norms would show.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def tokens_for(vocab: int, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: f"v{s[0]}-h{s[3]}-kv{s[4]}-{'tied' if s[6] else 'untied'}")
def test_from_hf_matches_hf_logits(shape):
    hf = hf_llama(*shape)
    model, cfg = from_hf(hf)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == shape[:6]
    assert cfg.tie_embeddings == shape[6] and cfg.rope_theta == shape[7]
    assert (model.output.weight is model.tok_embeddings.weight) == shape[6]
    tokens = tokens_for(cfg.vocab_size)
    expected = hf_logits(hf, tokens)
    assert expected.std() > 0.3  # the comparison below is not between two near-zero tensors
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", HF_SHAPES[:2], ids=["untied", "gqa-tied"])
def test_round_trip_through_ours(shape):
    hf = hf_llama(*shape)
    model, cfg = from_hf(hf)
    back = to_hf(model, cfg)
    assert isinstance(back, LlamaForCausalLM) and not back.training
    tokens = tokens_for(cfg.vocab_size)
    torch.testing.assert_close(hf_logits(back, tokens), hf_logits(hf, tokens), atol=1e-4, rtol=0)
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_matches_our_logits(tied):
    cfg = ModelConfig(vocab_size=89, dim=48, n_layers=2, n_heads=6, n_kv_heads=3, tie_embeddings=tied,
                      max_seq_len=64, init_std=0.2, rope_theta=20000.0)
    model = build_model(cfg).to_empty(device="cpu")
    init_weights(model, cfg, seed=2)
    hf = to_hf(model, cfg)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    tokens = tokens_for(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, tokens), model(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [HF_SHAPES[0], HF_SHAPES[1]], ids=["untied", "gqa-tied"])
def test_from_saved_directory(shape, tmp_path):
    hf = hf_llama(*shape)
    hf.save_pretrained(tmp_path)
    model, cfg = from_hf(tmp_path)
    same, _ = from_hf(str(tmp_path))
    tokens = tokens_for(cfg.vocab_size)
    expected = hf_logits(hf, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(same(tokens), expected, atol=1e-4, rtol=0)


def test_from_hf_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        from_hf(tmp_path / "meta-llama/Llama-3-8B")


def test_config_round_trip():
    for cfg in [ModelConfig(), ModelConfig(vocab_size=1001, dim=96, n_heads=6, n_kv_heads=2, ffn_dim=200,
                                           tie_embeddings=True, rope_theta=5e5, norm_eps=1e-6, max_seq_len=4096,
                                           init_std=0.01, dropout_attn=0.1)]:
        assert from_hf_config(to_hf_config(cfg)) == cfg


@pytest.mark.parametrize("field,value,message", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_type"),
    ("head_dim", 4, "head_dim"),
])
def test_unrepresentable_configs_are_refused(field, value, message):
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, **{field: value})
    with pytest.raises(ValueError, match=message):
        from_hf(LlamaForCausalLM(config))
