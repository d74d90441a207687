"""The decoder and its attention: masks against an explicit reference, packing, init, dropout, training, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.attention import auto_attention, get_attention, sdpa_attention, triton_attention
from trainers.config import ModelConfig
from trainers.model import build_model, flops_per_token, init_weights, num_params

SMALL = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def make_model(seed: int = 0, **overrides) -> tuple[nn.Module, ModelConfig]:
    cfg = ModelConfig(**{**SMALL, **overrides})
    model = build_model(cfg).to_empty(device="cpu")
    init_weights(model, cfg, seed)
    return model, cfg


def reference_attention(q, k, v, doc_ids):
    """Float64 softmax attention, mask spelled out: query i sees key j iff same document and j <= i.
    q (B, S, Hq, D), k/v (B, S, Hkv, D), doc_ids (B, S). Query head h uses kv head h // (Hq / Hkv)."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros(b, s, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            qh, kh, vh = q[bi, :, h].double(), k[bi, :, h // group].double(), v[bi, :, h // group].double()
            scores = qh @ kh.T / math.sqrt(d)
            for i in range(s):
                for j in range(s):
                    if j > i or doc_ids[bi, i] != doc_ids[bi, j]:
                        scores[i, j] = -math.inf
            out[bi, :, h] = scores.softmax(-1) @ vh
    return out


def cu_seqlens_of(doc_lengths: list[list[int]]) -> torch.Tensor:
    """Rows of document lengths (each row summing to S) -> int32 boundaries over the flattened tokens."""
    flat = [n for row in doc_lengths for n in row]
    return torch.tensor([0] + flat, dtype=torch.int32).cumsum(0, dtype=torch.int32)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("b", [2, 1], ids=["rows", "one-row"])  # one packed row: attention document by document
def test_sdpa_matches_reference(hq, hkv, packed, b):
    torch.manual_seed(0)
    s, d = 10, 8
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    lengths = ([[3, 4, 3], [1, 9]] if packed else [[s], [s]])[:b]
    doc_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    cu = cu_seqlens_of(lengths) if packed else None
    out = sdpa_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(map(max, lengths)))
    assert out.shape == (b, s, hq, d)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, doc_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("attention, block", [("triton", "torch"), ("sdpa", "triton")], ids=["attention", "norm-rope-swiglu"])
def test_model_on_the_triton_kernels_matches_pytorch(packed, attention, block):
    """The wiring of the kernels into the model. Attention: flattened rows, the batch's cu_seqlens (row starts
    included) as the kernel's documents, GQA. The block: RMSNorm, RoPE on q and k, SwiGLU. Logits and every
    gradient against the PyTorch model on the same weights (Triton's interpreter on a CPU; tests/gpu runs the
    kernels themselves at real sizes)."""
    models = {}
    for name, attn, kern in (("torch", "sdpa", "torch"), ("triton", attention, block)):
        cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                          attention=attn, kernels=kern)
        models[name] = build_model(cfg, device="meta").to_empty(device="cpu")
        init_weights(models[name], cfg, seed=5)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    cu = cu_seqlens_of([[7, 1, 16], [24]]) if packed else None
    outs = {}
    for name, model in models.items():
        logits = model(tokens, None if cu is None else doc_positions(cu, 2, 24), cu, 24 if cu is not None else None)
        logits.square().mean().backward()
        outs[name] = logits
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=2e-5, rtol=2e-5)
    for (name, p), q in zip(models["torch"].named_parameters(), models["triton"].parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=2e-4, msg=lambda m: f"{name}: {m}")


def doc_positions(cu: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """Positions restarting at every boundary in cu (over the flattened b*s tokens)."""
    starts = torch.zeros(b * s, dtype=torch.long)
    starts[cu[:-1].long()] = 1
    index = torch.arange(b * s)
    last_start = torch.cummax(torch.where(starts.bool(), index, 0), 0).values
    return (index - last_start).view(b, s)


def test_auto_attention_runs_sdpa_on_the_cpu_and_triton_refuses_dropout():
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    torch.testing.assert_close(auto_attention(q, k, v), sdpa_attention(q, k, v), atol=0, rtol=0)
    with pytest.raises(ValueError, match="model.dropout_attn"):
        triton_attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "documents"])
def test_gqa_equals_expanded_kv_heads(packed):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 12, 6, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    cu = cu_seqlens_of([[5, 7], [12]]) if packed else None
    grouped = sdpa_attention(q, k, v, cu_seqlens=cu)
    # query heads 0-2 read kv head 0, heads 3-5 kv head 1 (repeat_interleave, as in HF's repeat_kv)
    expanded = sdpa_attention(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), cu_seqlens=cu)
    torch.testing.assert_close(grouped, expanded, atol=1e-6, rtol=1e-6)


def test_get_attention():
    assert get_attention("sdpa") is sdpa_attention
    assert get_attention("auto") is auto_attention and get_attention("triton") is triton_attention
    with pytest.raises(ValueError, match="nope") as err:
        get_attention("nope")
    assert "sdpa" in str(err.value) and "auto" in str(err.value)


# ---------------------------------------------------------------- model


def test_forward_shapes_and_default_positions():
    model, cfg = make_model()
    tokens = torch.randint(0, cfg.vocab_size, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, cfg.vocab_size) and logits.dtype == torch.float32
    positions = torch.arange(11).expand(3, 11)
    torch.testing.assert_close(model(tokens, positions), logits, atol=0, rtol=0)
    # rotary embeddings are relative: shifting every position leaves the scores, so the logits, as they were...
    torch.testing.assert_close(model(tokens, positions + 17), logits, atol=1e-5, rtol=1e-5)
    # ...while changing the distances between tokens changes them, by more than the tolerance that held above
    # (at init, std 0.02, by a few 1e-4)
    assert not torch.allclose(model(tokens, positions * 2), logits, atol=1e-5, rtol=1e-5)


def test_packed_documents_equal_separate_runs():
    model, cfg = make_model()
    torch.manual_seed(0)
    a, b, c = (torch.randint(0, cfg.vocab_size, (n,)) for n in (5, 7, 12))
    tokens = torch.stack([torch.cat([a, b]), c])  # row 0 packs two documents, row 1 holds one
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    cu = cu_seqlens_of([[5, 7], [12]])
    packed = model(tokens, positions, cu, max_seqlen=12)
    for row, span, doc in [(0, slice(0, 5), a), (0, slice(5, 12), b), (1, slice(0, 12), c)]:
        torch.testing.assert_close(packed[row, span], model(doc[None])[0], atol=1e-5, rtol=1e-5)
    # without the document mask, b would see a: the test above can tell the difference
    unmasked = model(tokens, positions)
    assert not torch.allclose(unmasked[0, 5:], packed[0, 5:], atol=1e-3)


def test_dropout_acts_only_in_training():
    cfg_kw = dict(dropout_embed=0.3, dropout_attn=0.3, dropout_resid=0.3)
    model, cfg = make_model(**cfg_kw)
    plain, _ = make_model()  # same seed, same names: same weights, no dropout
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    model.eval()
    torch.testing.assert_close(model(tokens), plain(tokens), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    first = model(tokens)
    assert not torch.allclose(first, plain(tokens), atol=1e-3)
    assert not torch.allclose(first, model(tokens), atol=1e-3)  # a fresh mask each call


@pytest.mark.parametrize("name", ["dropout_embed", "dropout_attn"])
def test_embedding_and_attention_dropout_are_wired(name):
    model, cfg = make_model(**{name: 0.5})
    plain, _ = make_model()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.manual_seed(0)
    assert not torch.allclose(model.train()(tokens), plain(tokens), atol=1e-3)


@pytest.mark.parametrize("silenced", ["attention.wo", "feed_forward.w2"])
def test_residual_dropout_is_on_both_branches(silenced):
    # zeroing one branch's output projection leaves only the other branch for dropout to act on
    model, cfg = make_model(dropout_resid=0.5)
    plain, _ = make_model()
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *plain.named_parameters()]:
            if name.endswith(f"{silenced}.weight"):
                p.zero_()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.manual_seed(0)
    assert not torch.allclose(model.train()(tokens), plain(tokens), atol=1e-3)


# ---------------------------------------------------------------- init


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_init_is_deterministic_and_seeded():
    same_a, same_b = params(make_model(seed=3)[0]), params(make_model(seed=3)[0])
    other = params(make_model(seed=4)[0])
    assert same_a.keys() == same_b.keys() == other.keys()
    for name in same_a:
        torch.testing.assert_close(same_a[name], same_b[name], atol=0, rtol=0)
        if not name.endswith("norm.weight"):
            assert not torch.equal(same_a[name], other[name]), name
    # names seed the draws: no two matrices of the same shape start equal
    assert not torch.equal(same_a["layers.0.attention.wq.weight"], same_a["layers.1.attention.wq.weight"])


def test_init_on_meta_matches_init_on_cpu():
    cfg = ModelConfig(**SMALL)
    on_cpu = build_model(cfg, device="cpu")
    init_weights(on_cpu, cfg, seed=5)
    on_meta = build_model(cfg)
    assert all(p.is_meta for p in on_meta.parameters())
    with pytest.raises(ValueError, match="to_empty"):
        init_weights(on_meta, cfg, seed=5)
    on_meta.to_empty(device="cpu")
    init_weights(on_meta, cfg, seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    torch.testing.assert_close(on_meta(tokens), on_cpu(tokens), atol=0, rtol=0)  # rotary tables rebuilt too


def test_init_distribution():
    model, cfg = make_model(dim=64, ffn_dim=256, n_layers=3, init_std=0.05)
    resid_std = 0.05 / math.sqrt(2 * 3)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            expected = resid_std if name.endswith(("wo.weight", "w2.weight")) else 0.05
            assert abs(p.std().item() / expected - 1) < 0.1, (name, p.std().item(), expected)
            assert abs(p.mean().item()) < 4 * expected / math.sqrt(p.numel()) + 1e-4, name


def test_tied_embeddings_stay_tied():
    model, cfg = make_model(tie_embeddings=True)  # built on meta, then to_empty: the tie must survive
    assert model.output.weight is model.tok_embeddings.weight
    untied, _ = make_model(tie_embeddings=False)
    assert num_params(untied) - num_params(model) == cfg.vocab_size * cfg.dim
    # a gradient step moves the shared matrix through both of its uses
    before = model.tok_embeddings.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randint(0, cfg.vocab_size, (1, 6))).sum().backward()
    opt.step()
    assert model.output.weight is model.tok_embeddings.weight
    assert not torch.equal(model.tok_embeddings.weight, before)


def test_num_params_counts_modules():
    model, cfg = make_model(ffn_dim=48)
    d, hd, kv = cfg.dim, cfg.head_dim, cfg.kv_heads
    per_layer = 2 * d * d + 2 * d * kv * hd + 3 * d * 48 + 2 * d  # wq, wo, wk, wv, MLP, two norms
    expected = cfg.vocab_size * d * 2 + cfg.n_layers * per_layer + d
    assert num_params(model) == expected
    assert num_params(model, exclude_embeddings=True) == expected - cfg.vocab_size * d


def test_flops_per_token_counts_every_linear():
    model, cfg = make_model(ffn_dim=80, n_layers=3)
    seq_len = 48
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    assert flops_per_token(cfg, seq_len) == 6 * matmul_weights + attention
    assert flops_per_token(cfg, 2 * seq_len) - flops_per_token(cfg, seq_len) == attention


# ---------------------------------------------------------------- training


def test_a_few_steps_reduce_the_loss():
    model, cfg = make_model(seed=1)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # small init: near-uniform predictions
    assert losses[-1] < 0.5 * losses[0], losses


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_activation_checkpointing_keeps_every_gradient_and_saves_less():
    """Recomputed blocks give the same logits and gradients (dropout masks included: the recompute replays
    the RNG) while keeping a fraction of the activations."""
    from trainers.parallel import apply_ac

    tokens = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    cu = cu_seqlens_of([[20, 1, 27], [48]])
    runs = {}
    for name in ("plain", "recompute"):
        model, _ = make_model(seed=4, n_layers=3, dropout_resid=0.2, dropout_attn=0.1, dropout_embed=0.1)
        if name == "recompute":
            apply_ac(model)
        torch.manual_seed(7)
        out = {}
        out["saved"] = saved_bytes(lambda: out.setdefault("logits", model(tokens, doc_positions(cu, 2, 48), cu, 27)))
        out["logits"].square().mean().backward()
        runs[name] = (model, out)
    (plain, p_out), (ac, a_out) = runs["plain"], runs["recompute"]
    assert all(layer.recompute for layer in ac.layers) and not any(layer.recompute for layer in plain.layers)
    torch.testing.assert_close(a_out["logits"], p_out["logits"], atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), ac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert a_out["saved"] < 0.5 * p_out["saved"]
    with torch.no_grad():  # no backward to recompute for: the block runs once, plainly
        torch.testing.assert_close(ac.eval()(tokens), plain.eval()(tokens))
