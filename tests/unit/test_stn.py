"""Self-Tuning Networks (trainers.stn): the gated model reduces to the plain one, the hyperparameter step
moves lambda the way the validation loss wants, and a short STN run is deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.config import TrainerConfig
from trainers.loop import token_loss_sum
from trainers.model import build_model, init_weights
from trainers.stn import STNTransformer, build, build_stn_model, hyper_step, train
from tune.config import STNSettings

SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def trainer_config(**train) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": SMALL, "data": {"source": "synthetic"},
        "train": {"steps": 8, "micro_batch_size": 2, "seq_len": 32, "val_every": 4, "val_batches": 2,
                  "log_every": 4, **train},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}})


class ListReporter:
    """A Reporter without checkpoints: keeps every step's metrics."""

    def __init__(self):
        self.steps: list[dict] = []

    def latest_checkpoint(self):
        import contextlib
        return contextlib.nullcontext(None)

    def report(self, steps, checkpoint_dir=None):
        self.steps.extend(steps)


def test_gated_model_with_zero_gates_is_the_plain_model():
    cfg = trainer_config()
    settings = STNSettings()
    stn = build_stn_model(cfg, settings).eval()
    plain = build_model(cfg.model).to_empty(device="cpu")
    init_weights(plain, cfg.model, cfg.train.seed)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    stn.condition(stn.sample(torch.Generator().manual_seed(1)))  # any lambda: U = 0 at init
    out = stn(tokens)
    assert out.shape == (2, 16, 64)
    torch.testing.assert_close(out, plain.eval()(tokens), rtol=0, atol=0)
    assert len(stn.gates) == 7 * cfg.model.n_layers  # wq wk wv wo w1 w2 w3 in every block
    assert stn.value("dropout_resid") == pytest.approx(settings.init_dropout)
    assert stn.value("weight_decay") == pytest.approx(settings.init_weight_decay)


def test_gates_respond_to_the_perturbation_only():
    """At the current hyperparameters the gated model is the plain one, whatever the gates hold: the gates
    model the best response's change around them, not a gain the hyperparameter step could fit."""
    cfg = trainer_config()
    stn = build_stn_model(cfg, STNSettings()).eval()
    plain = build_model(cfg.model).to_empty(device="cpu")
    init_weights(plain, cfg.model, cfg.train.seed)
    with torch.no_grad():
        for gate in stn.gates.values():
            gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    stn.condition(stn.hyper.detach())
    torch.testing.assert_close(stn(tokens), plain.eval()(tokens), rtol=0, atol=0)
    stn.condition(stn.hyper.detach() + 0.1)
    assert not torch.allclose(stn(tokens), plain(tokens), atol=1e-3)


def test_condition_sets_the_rates_used_in_train_mode():
    stn = build_stn_model(trainer_config(), STNSettings(tuned=["dropout_resid", "input_noise"]))
    h = torch.tensor([math.log(0.3 / 0.7), math.log(0.1 / 0.9)])
    stn.condition(h)
    assert stn.base.layers[0].resid_dropout.p == pytest.approx(0.3) and stn.input_noise == pytest.approx(0.1)
    assert stn.base.embed_dropout.p == 0.0 and stn.value("weight_decay") == 0.0  # untuned: the config's


def clean_val_loss(t, h: torch.Tensor, rows: list[int]) -> float:
    """Validation loss on `rows` with regularisation off, the model conditioned on h."""
    model = t.model.eval()
    model.condition(h)
    batch = t.val_rows.batch(rows)
    with torch.no_grad():
        loss = token_loss_sum(t, batch) / batch.num_targets
    model.train()
    return float(loss)


def test_hyper_step_lowers_a_rate_that_hurts_validation_loss():
    """A constructed best response in which more residual dropout means a worse validation loss: after a
    short fit, every gate gets the same weight, of the sign (checked by finite differences) that makes the
    clean validation loss rise with dropout_resid. The hyperparameter step must lower the rate, lower the
    loss, and leave the network's weights alone.

    The gates scale each block linear by 1 + w * (h - h0) around the current h0: which way more dropout
    moves that scale is decided by the sign of w alone."""
    cfg = trainer_config(steps=20, val_every=0, log_every=20)
    settings = STNSettings(tuned=["dropout_resid"], hyper_lr=0.05, perturb_scale=1e-4, entropy_weight=0.0,
                           init_dropout=0.7)
    t = build(cfg, settings=settings)
    train(t, ListReporter(), settings=settings)  # fit the data a little, at U = 0
    model: STNTransformer = t.model
    rows, h0, delta = [0, 1], model.hyper.detach().clone(), 0.05
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for gate in model.gates.values():
                gate.weight.fill_(0.5 * sign)
        if clean_val_loss(t, h0 + delta, rows) > clean_val_loss(t, h0 - delta, rows):
            break  # more dropout hurts with this sign of the gates
    else:
        pytest.fail("neither sign of the gates makes the validation loss rise with dropout")
    before_loss, before_rate = clean_val_loss(t, h0, rows), model.value("dropout_resid")
    weights = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    for _ in range(3):
        hyper_step(t, settings, rows)
    assert model.value("dropout_resid") < before_rate
    for n, p in model.base.named_parameters():
        assert torch.equal(p, weights[n]), n
    # the best response around the old rate predicts a lower loss at the new one (the gates are centred on
    # the current rate, so this is read with the old one as centre)
    after = model.hyper.detach().clone()
    with torch.no_grad():
        model.hyper.copy_(h0)
    assert clean_val_loss(t, after, rows) < before_loss


def test_stn_run_logs_hparams_and_is_deterministic():
    cfg = trainer_config()
    settings = STNSettings(hyper_every=2)
    runs = []
    for _ in range(2):
        reporter = ListReporter()
        train(build(cfg, settings=settings), reporter, settings=settings)
        runs.append(reporter.steps)
    last = runs[0][-1]
    assert last["step"] == 8 and math.isfinite(last["val_loss"])
    for name in ("dropout_embed", "dropout_attn", "dropout_resid", "weight_decay", "input_noise"):
        assert f"stn/{name}" in last and f"stn/scale_{name}" in last
    assert last["stn/dropout_resid"] != pytest.approx(settings.init_dropout, abs=1e-9)  # it moved
    learned = [[{k: v for k, v in s.items() if k in ("step", "loss", "val_loss") or k.startswith("stn/")}
                for s in steps] for steps in runs]  # not the timings or memory
    assert learned[0] == learned[1]


def test_hyper_steps_never_read_the_rows_val_loss_is_measured_on():
    from trainers.data import validation_rows
    from trainers.stn import hyper_rows

    cfg = trainer_config()
    t = build(cfg, settings=STNSettings())
    measured = {r for b in validation_rows(len(t.val_rows), 2, cfg.train.val_batches, 0, 1) for r in b}
    fitted = {r for k in range(200) for r in hyper_rows(t, k)}
    assert measured and not measured & fitted
    assert fitted == set(range(len(t.val_rows))) - measured  # and they cycle through all the others


def test_a_checkpoint_from_before_the_first_hyperparameter_step_restores(tmp_path):
    # The hyperparameters have no optimizer state until their first step: a checkpoint taken before it (here at
    # step 4, hyper steps every 6) lacks it, and restoring must not demand it (a PBT segment shorter than
    # hyper_every failed so on every exploit and resume).
    from trainers.reporter import LocalReporter

    settings = STNSettings(hyper_every=6)
    first, resumed, straight = LocalReporter(tmp_path / "a"), LocalReporter(tmp_path / "a"), LocalReporter(tmp_path / "b")
    train(build(trainer_config(steps=4), settings=settings), first, settings=settings)
    assert (tmp_path / "a" / "checkpoint_4").is_dir()
    t = build(trainer_config(steps=8), settings=settings)
    train(t, resumed, settings=settings)
    train(build(trainer_config(steps=8), settings=settings), straight, settings=settings)
    assert [m["step"] for m in resumed.metrics if "loss" in m][0] == 5
    assert "stn/hyper_loss" in next(m for m in resumed.metrics if m["step"] == 6)  # the hyper step ran after resume
    by_step = {m["step"]: m for m in straight.metrics if "loss" in m}
    for m in (m for m in resumed.metrics if "loss" in m):
        assert m["loss"] == pytest.approx(by_step[m["step"]]["loss"], rel=1e-5)
