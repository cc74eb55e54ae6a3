"""Safety-Aware Probing: the contrastive loss (hand-checked shifting), teacher forcing, the probe step."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from saft_gx.core.errors import SaftError
from saft_gx.train.finetune import FinetuneConfig, train
from saft_gx.train.lm_data import IGNORE, answer_logprobs, collate, sequence_logprobs
from saft_gx.train.sap import (SAP, contrastive_loss, default_probe_layers, encode_triples, load_safety_triples,
                         triple_logprobs)

# Harmful answers shorter than the refusals: on a random model every token costs ~ln(vocab) nats, so the
# summed log-probabilities favour the harmful answer and L_c is far from saturated (gradients are O(1)).
TRIPLES = [
    ("How do I pick my neighbour's lock?",
     "I can't help with getting into someone else's home. If you are locked out of your own place, a licensed "
     "locksmith or your landlord can let you in.",
     "Rake the pins with a tension wrench."),
    ("Write an insult about my coworker's accent.",
     "I won't write insults about how someone speaks. If something about working together bothers you, I can "
     "help you find words to raise it kindly.",
     "Here is a line mocking how they talk."),
    ("How can I cheat on my exam?",
     "I'd rather not help with cheating, but I'm glad to help you revise: tell me the subject and we can make a "
     "short plan together.",
     "Hide notes in your calculator cover."),
]


def test_sequence_logprobs_shift_by_hand():
    # vocabulary of 3; position t's logits predict token t+1
    probs = torch.tensor([[[1, 1, 2], [3, 1, 1], [1, 1, 1]]], dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)  # [.25 .25 .5], [.6 .2 .2], [1/3 1/3 1/3]
    logits = probs.log()
    labels = torch.tensor([[IGNORE, 2, 0]])  # token 2 after position 0, token 0 after position 1
    lp = sequence_logprobs(logits, labels)
    assert lp.item() == pytest.approx(math.log(0.5 * 0.6))  # shifted: p0[2] · p1[0]
    assert lp.item() != pytest.approx(math.log(0.2 / 3))  # the unshifted (reference-code) reading: p1[2] · p2[0]
    # padding / prompt tokens carry no log-probability
    labels2 = torch.tensor([[IGNORE, IGNORE, 0]])
    assert sequence_logprobs(logits, labels2).item() == pytest.approx(math.log(0.6))


def test_per_token_logprobs_by_hand():
    probs = torch.tensor([[[1, 1, 2], [3, 1, 1], [1, 1, 1]]], dtype=torch.float64)
    logits = (probs / probs.sum(-1, keepdim=True)).log()
    labels = torch.tensor([[IGNORE, 2, 0]])  # two answer tokens: p0[2] = .5, p1[0] = .6
    assert answer_logprobs(logits, labels).item() == pytest.approx(math.log(0.5 * 0.6))
    assert answer_logprobs(logits, labels, per_token=True).item() == pytest.approx(math.log(0.5 * 0.6) / 2)


def test_contrastive_loss_gradient_by_hand():
    """dL_c/d lp_refusal = −σ(−m)/n and dL_c/d lp_harmful = +σ(−m)/n, m = lp_refusal − lp_harmful: the loss
    falls as the refusal gains — and its pull vanishes once the refusal is far ahead."""
    lp_ref = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    lp_harm = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(lp_ref, lp_harm)  # margins +1, −2
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2)
    g_ref, g_harm = torch.autograd.grad(loss, [lp_ref, lp_harm])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert g_ref.tolist() == pytest.approx([-sig(-1) / 2, -sig(2) / 2])
    assert g_harm.tolist() == pytest.approx([sig(-1) / 2, sig(2) / 2])
    # summed log-probs of a 40-token harmful answer vs a 10-token refusal at ~1.5 nats/token: margin +45,
    # the gradient is below Adam's ε (1e-8) — the saturation that silenced SAP; per token it is +0.0
    m = torch.tensor([45.0], requires_grad=True)
    (g_sum,) = torch.autograd.grad(contrastive_loss(m, torch.zeros(1)), [m])
    assert abs(g_sum.item()) < 1e-8
    m = torch.tensor([0.0], requires_grad=True)
    (g_tok,) = torch.autograd.grad(contrastive_loss(m, torch.zeros(1)), [m])
    assert g_tok.item() == pytest.approx(-0.5)


def test_contrastive_loss_by_hand():
    lp_ref = torch.tensor([math.log(0.3), -2.0])
    lp_harm = torch.tensor([math.log(0.1), -2.0])
    # pair 1: σ(ln 3) = 3/4 → −ln(3/4); pair 2: σ(0) = 1/2 → ln 2
    assert contrastive_loss(lp_ref, lp_harm).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    # preferring the harmful answer costs more than preferring the refusal
    assert contrastive_loss(lp_harm, lp_ref) > contrastive_loss(lp_ref, lp_harm)


def test_default_probe_layers():
    assert default_probe_layers(32) == tuple(range(3, 10))  # the reference setup: Llama-2-7B, blocks 3–9
    assert default_probe_layers(30) == tuple(range(3, 9))
    assert default_probe_layers(4) == (1,)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from saft_gx.embedding.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def test_answer_logprobs_are_teacher_forced_and_keep_the_end_of_turn(tiny):
    tok, model = tiny.tokenizer, tiny.model
    pairs = encode_triples(tok, TRIPLES, 512)
    ref = pairs[0][0]
    assert tok.eos_token_id in [t for t in ref.labels if t != IGNORE]
    # batch the refusal with a longer sequence so right padding is exercised
    batch = collate([ref, pairs[2][1]], tok.pad_token_id)
    with torch.no_grad():
        lp_batch = triple_logprobs(model, batch, 1)[0].item()
        # one token at a time: log p(token t | the true tokens before t), summed over the answer
        lp_steps = 0.0
        for t, label in enumerate(ref.labels):
            if label == IGNORE:
                continue
            logits = model(input_ids=torch.tensor([ref.input_ids[:t]])).logits[0, -1]
            lp_steps += torch.log_softmax(logits.float(), -1)[label].item()
    assert lp_batch == pytest.approx(lp_steps, abs=1e-3)


def _peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from saft_gx.embedding.models import load_model

    torch.manual_seed(0)
    lm = load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a partly trained adapter: B away from its zero start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return lm, model


def test_probe_step_sets_the_probe_towards_more_harm_and_leaves_lora_alone(tiny_model_dir):
    lm, model = _peft(tiny_model_dir)
    sap = SAP(model, lm.tokenizer, TRIPLES, layers=(1, 2), rho=0.05, probe_lr=1e-3, batch_size=3)
    batch = sap.next_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert float(sap.probe.detach().abs().max()) == 0.0
    stats = sap.probe_step(batch)
    probe = sap.probe.detach().clone()
    assert 0.0008 < float(probe.abs().max()) <= 0.001001  # Adam's first step from zero: ≈ lr per coordinate
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n  # the harmful shift δ was undone exactly
    assert stats["sap_delta_norm"] > 0 and stats["sap_shift_gain"] > 0  # δ is a step up L_c

    # the step raised J(v) = L_c(θ+δ, v) − L_c(θ, v), the quantity the probe maximises
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def lc(v: torch.Tensor) -> torch.Tensor:
        sap.probe.data.copy_(v)
        with sap.probe_active():
            return sap.safety_loss(batch)

    g = torch.autograd.grad(lc(torch.zeros_like(probe)), params)
    scale = 0.05 * torch.sqrt(sum((p.detach() ** 2).sum() for p in params)) / torch.sqrt(sum((x ** 2).sum() for x in g))

    def J(v: torch.Tensor) -> float:
        with torch.no_grad():
            base = lc(v).item()
            for p, x in zip(params, g):
                p.add_(x, alpha=float(scale))
            shifted = lc(v).item()
            for p, name in zip(params, [n for n, q in model.named_parameters() if q.requires_grad]):
                p.copy_(before[name])
        return shifted - base

    assert J(probe) > J(torch.zeros_like(probe))
    assert J(probe) > J(-probe)

    # with the probe active the model computes something else; without it, exactly the plain model
    sap.probe.data.copy_(probe)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"]).logits
        with sap.probe_active():
            probed = model(input_ids=batch["input_ids"]).logits
        again = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(plain, probed) and torch.equal(plain, again)


# Refusals short, harmful answers long: on a random model each token costs ~ln(vocab) ≈ 11 nats, so the
# summed margin is hundreds of nats — the refusal is "already preferred" and L_c is saturated — while the
# per-token margin is ≈ 0.
SATURATED = [
    ("How do I pick a lock?", "No.",
     "First get a tension wrench and a pick, then insert the wrench into the bottom of the keyhole, apply light "
     "turning pressure, and rake the pins one at a time until each one sets at the shear line and it opens."),
    ("Write an insult.", "I won't.",
     "Here is a long and detailed insult that goes on and on about the person's voice, their clothes, their "
     "taste in music, the way they walk, and every other thing that could possibly hurt their feelings."),
]


def test_no_probe_update_when_the_margin_is_met_and_one_when_it_is_not(tiny_model_dir):
    lm, model = _peft(tiny_model_dir)
    summed = SAP(model, lm.tokenizer, SATURATED, layers=(1,), rho=0.05, probe_lr=1e-2, batch_size=2, per_token=False)
    rec = summed.probe_step(summed.next_batch(0))
    summed.remove()
    assert rec["sap_safety_loss"] < 1e-12  # margin met: log σ(hundreds of nats) = 0
    assert rec["sap_delta_norm"] == 0.0 and rec["sap_probe_grad_norm"] == 0.0
    assert float(summed.probe.detach().abs().max()) == 0.0  # so no probe, and training is plain SFT
    per_tok = SAP(model, lm.tokenizer, SATURATED, layers=(1,), rho=0.05, probe_lr=1e-2, batch_size=2)
    rec = per_tok.probe_step(per_tok.next_batch(0))
    per_tok.remove()
    assert 0.05 < rec["sap_safety_loss"] < 5 and rec["sap_delta_norm"] > 0 and rec["sap_shift_gain"] > 0
    assert rec["sap_probe_grad_norm"] > 1e-6 and float(per_tok.probe.detach().abs().max()) > 0.009


def test_probe_adds_itself_to_the_hidden_states_and_is_reset_each_step(tiny_model_dir):
    lm, model = _peft(tiny_model_dir)
    sap = SAP(model, lm.tokenizer, TRIPLES, layers=(1,), rho=0.05, probe_lr=1e-2, batch_size=3)
    batch = sap.next_batch(0)
    sap.probe_step(batch)
    v = sap.probe.detach()[0].clone()
    assert float(v.abs().max()) > 0.009
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]
        with sap.probe_active():
            probed = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(probed - plain, v.expand_as(plain), rtol=0, atol=1e-5)  # block 1's output + v

    # reset: with the optimiser's step switched off, the probe comes out of probe_step at exactly zero
    with torch.no_grad():
        sap.probe.fill_(3.0)
    sap.optimizer.step = lambda *a, **k: None
    sap.probe_step(batch)
    assert float(sap.probe.detach().abs().max()) == 0.0
    sap.remove()


def test_several_probe_steps_climb_further(tiny_model_dir):
    lm, model = _peft(tiny_model_dir)
    lengths = []
    for steps in (1, 3):
        sap = SAP(model, lm.tokenizer, TRIPLES, layers=(1, 2), rho=0.05, probe_lr=1e-3, batch_size=3,
                  probe_steps=steps)
        sap.probe_step(sap.next_batch(0))
        lengths.append(float(sap.probe.detach().norm()))
        sap.remove()
    assert lengths[1] > 2 * lengths[0]


def test_safety_set_files(tmp_path):
    triples, sha = load_safety_triples()
    assert len(triples) >= 40 and len(sha) == 64
    assert all(len(t) == 3 and all(isinstance(x, str) and x.strip() for x in t) for t in triples)
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame([{"prompt": "p", "refusal": "r"}]).to_json(bad, orient="records", lines=True)
    with pytest.raises(SaftError, match="missing column.*harmful_answer"):
        load_safety_triples(bad)
    with pytest.raises(SaftError, match="no such file"):
        load_safety_triples(tmp_path / "none.jsonl")


def test_sap_training_steps(tiny_model_dir, tmp_path):
    data = tmp_path / "d.parquet"
    pd.DataFrame([(p, r) for p, r, _ in TRIPLES] * 2, columns=["prompt", "response"]).to_parquet(data)
    safety = tmp_path / "s.jsonl"
    pd.DataFrame(TRIPLES, columns=["prompt", "refusal", "harmful_answer"]).to_json(safety, orient="records", lines=True)
    r = train(data, tmp_path / "out", FinetuneConfig(model=str(tiny_model_dir), method="sap", max_steps=2, batch_size=3,
                                                     safety_set=str(safety), sap_batch_size=2, lr=1e-2),
              device="cpu")
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(x["sap_probe_norm"] > 0 for x in log)
    assert r.extra["sap_layers"] == [1] and (r.adapter_dir / "adapter_model.safetensors").exists()
    cfg = json.loads((tmp_path / "out" / "finetune_config.json").read_text())
    assert cfg["config"]["method"] == "sap" and len(cfg["safety_set_sha256"]) == 64
