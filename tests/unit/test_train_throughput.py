"""bench/train_throughput.py --smoke: every engine (HF eager and compiled, the fsdp and deepspeed engines)
trains the same tiny model from the same weights on the same batches, and computes the same losses and
gradient norms. In float32 on a CPU they differ only in summation order (1e-7 relative, measured), so 1e-5
catches a wrong weight mapping, loss normalisation, clipping or optimizer setting in any of them. A subprocess:
the bench starts its own process group and imports DeepSpeed (about 30 s on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["hf-eager", "hf-compiled", "fsdp", "deepspeed-zero2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "train_throughput.md"
    # as a user runs it: no Triton interpreter (tests/conftest.py sets it for this process)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLOTILLA_KERNELS")}
    done = subprocess.run([sys.executable, "bench/train_throughput.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads(out.with_suffix(".json").read_text())


def test_every_engine_ran_and_learned(smoke):
    _, result = smoke
    rows = {r["engine"]: r for r in result["rows"]}
    assert list(rows) == ENGINES
    for r in rows.values():
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"] + r["grad_norms"])
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["peak_memory_gib"] is None  # no peaks on a CPU
    reference = rows["hf-eager"]
    # the curves compared below move, far beyond the 1e-5 they must agree to (each step a new batch, so not
    # necessarily downhill in 4 steps: with issue 25's initialisation 4.86, 4.94, 4.83, 4.86)
    assert max(reference["losses"]) - min(reference["losses"]) > 0.05
    assert max(reference["grad_norms"]) > 1.0  # train.grad_clip = 1.0 acts: clipping is compared too


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_engines_agree_with_hf_eager(smoke, engine):
    _, result = smoke
    rows = {r["engine"]: r for r in result["rows"]}
    assert rows[engine]["losses"] == pytest.approx(rows["hf-eager"]["losses"], rel=1e-5)
    assert rows[engine]["grad_norms"] == pytest.approx(rows["hf-eager"]["grad_norms"], rel=1e-5)


def test_results_say_what_ran_where(smoke):
    out, result = smoke
    text = out.read_text()
    env = result["environment"]
    assert env["device"].startswith("CPU") and env["dtype"] == "float32" and env["compile_backend"] == "aot_eager"
    assert set(env["versions"]) == {"torch", "cuda", "transformers", "deepspeed", "triton", "python"}
    assert "| engine | tokens/s | MFU | peak memory (GiB) | vs hf-compiled | loss after N steps | runs |" in text
    assert "| hf-compiled |" in text and "| 1.00x |" in text
    assert "FSDPEngine, torch AdamW; attention sdpa, rms_norm torch, rope torch, swiglu torch" in text


def test_llama_1b_config_is_the_tinyllama_shape():
    """What the benchmark trains on a GPU: hidden 2048, 22 layers, 32 heads, 4 kv heads, MLP 5632, vocabulary
    32000, sequence 2048; TinyLlama-1.1B's 1,100,048,384 parameters."""
    from orchestrator.config import load_config
    from orchestrator.plan import count_params

    config = load_config(ROOT / "configs" / "llama-1b.yaml")
    m = config.model
    assert (m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.vocab_size) == (2048, 22, 32, 4, 5632, 32000)
    assert config.train.seq_len == m.max_seq_len == 2048 and not m.tie_embeddings
    assert count_params(m).total == 1_100_048_384
