"""Safety-Aware Probing (SAP; Wu et al., arXiv 2505.16737), written from the equations (docs/methods.md, section 6).

A probe is a set of bias vectors v_l added to the residual stream (the output of decoder block l) at a few
layers. Each optimiser step:

1. contrastive safety loss on a batch of (harmful prompt, refusal, harmful answer) triples
       L_c(θ, v) = − mean log σ( log p(refusal | prompt) − log p(harmful answer | prompt) )
   with log-probabilities teacher-forced on the true answer text, each answer in its own sequence,
   shifted for next-token prediction, and the end-of-turn token included;
2. a harmful weight shift δ = ρ · ‖θ_LoRA‖ · g / ‖g‖, g = ∂L_c/∂θ_LoRA (norms over all LoRA weights):
   a step *up* L_c, i.e. towards preferring the harmful answer;
3. the probe, reset to zero, takes ``probe_steps`` Adam steps (learning rate ``probe_lr``) that
   *increase* J(v) = L_c(θ+δ, v) − L_c(θ, v): the hidden-state direction along which a small harmful
   weight step hurts safety most. (Both losses are evaluated in eval mode, so dropout cannot swamp the
   tiny δ.)
4. the task step (the caller's) runs with the probe added, so its gradient is taken away from that
   direction.

**Per-token log-probabilities (``per_token=True``, the default).** The paper sums log-probabilities over
the answer tokens. A refusal is short and a harmful answer long, so the summed gap is tens of nats,
σ(gap) ≈ 1, and L_c, its gradient g and ∂J/∂v all vanish (≈ e^−gap); Adam's ε (1e-8) then exceeds the
probe's gradient and the probe stays ≈ 0. The mean log-probability per answer token keeps the gap near
one nat, where log σ still has slope; ``examples/saft_pipeline/probe_signal.py`` prints both on the same
batch. ``per_token=False`` restores the sums.

Where the reference code differs (labels not shifted, EOS masked out, the harmful answer scored on the
refusal's tokens instead of teacher-forced on its own, the probe fitted on the task loss) we follow the
equations above. The probe's Adam moments persist across steps, as in the reference; its value does not.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import SaftError
from .lm_data import Example, answer_logprobs, collate, encode_row
from ..embedding.rows import Row

TRIPLE_COLUMNS = ("prompt", "refusal", "harmful_answer")
SHIPPED_SAFETY_SET = Path(__file__).parents[1] / "data" / "safety_triples.jsonl"
# the probe's Adam step size: in examples/saft_pipeline/sweep.py (1 epoch, 2 seeds) 0.1 was the one setting
# above both plain SFT and the random-removal control with benign loss within 2 % (0.05: not above the control;
# 0.2 on layers 3-15: far above, but +4.9 % benign loss)
DEFAULT_PROBE_LR = 0.1


def default_probe_layers(num_layers: int) -> tuple[int, ...]:
    """Blocks ≈ 3/32 … 9/32 of the depth (the reference uses blocks 3–9 of Llama-2-7B's 32); 1-based."""
    lo = max(1, round(3 / 32 * num_layers))
    hi = max(lo, min(num_layers, round(9 / 32 * num_layers)))
    return tuple(range(lo, hi + 1))


def load_safety_triples(path: str | Path | None = None) -> tuple[list[tuple[str, str, str]], str]:
    """(prompt, refusal, harmful answer) triples from a jsonl/parquet/csv file (default: the shipped set)
    and the file's sha256."""
    from ..io.readers import open_dataset
    from ..embedding.rows import check_str

    p = Path(path) if path else SHIPPED_SAFETY_SET
    if not p.exists():
        raise SaftError(f"--safety-set {p}: no such file" if path else
                        f"the shipped safety set {p} is missing; reinstall saft-gx or pass --safety-set")
    ds = open_dataset(p)
    missing = [c for c in TRIPLE_COLUMNS if c not in ds.columns]
    if missing:
        raise SaftError(f"--safety-set {p}: missing column(s) {', '.join(missing)}; a safety set needs "
                        f"{', '.join(TRIPLE_COLUMNS)} (the file has: {', '.join(ds.columns)})")
    triples: list[tuple[str, str, str]] = []
    for first, df in ds.frames(list(TRIPLE_COLUMNS)):
        for i, vals in enumerate(df.itertuples(index=False, name=None)):
            triples.append(tuple(check_str(v, c, first + i) for v, c in zip(vals, TRIPLE_COLUMNS)))  # type: ignore[misc]
    if not triples:
        raise SaftError(f"--safety-set {p}: has no rows")
    return triples, hashlib.sha256(p.read_bytes()).hexdigest()


def encode_triples(tokenizer: Any, triples: Sequence[tuple[str, str, str]], max_length: int
                   ) -> list[tuple[Example, Example]]:
    """(refusal example, harmful-answer example) per triple, formatted like training rows."""
    out = []
    for i, (prompt, refusal, harmful) in enumerate(triples):
        pair = tuple(encode_row(tokenizer, Row(messages=(("user", prompt), ("assistant", a))), max_length)
                     for a in (refusal, harmful))
        if any(e.n_target == 0 for e in pair):
            raise SaftError(f"safety triple {i}: its prompt fills --max-length {max_length}; raise it")
        out.append(pair)  # type: ignore[arg-type]
    return out


def contrastive_loss(lp_refusal: Any, lp_harmful: Any) -> Any:
    """L_c = − mean log σ(lp_refusal − lp_harmful). Its gradient with respect to the margin
    m = lp_refusal − lp_harmful is −σ(−m) / n: ≈ 0 once the refusal is ahead by a few nats."""
    import torch.nn.functional as F

    return -F.logsigmoid(lp_refusal - lp_harmful).mean()


def triple_logprobs(model: Any, batch: dict[str, Any], n: int, *, per_token: bool = False) -> tuple[Any, Any]:
    """Answer log-probs (summed, or the mean per answer token with ``per_token``) of a collated batch
    whose first ``n`` rows are refusals and last ``n`` the harmful answers to the same prompts."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = answer_logprobs(logits, batch["labels"], per_token=per_token)
    return lp[:n], lp[n:]


class SAP:
    """The probe and its step. ``model`` is the peft model being trained (its trainable parameters are
    the LoRA weights)."""

    def __init__(self, model: Any, tokenizer: Any, triples: Sequence[tuple[str, str, str]], *,
                 layers: Sequence[int] | None = None, rho: float = 2e-5, probe_lr: float = DEFAULT_PROBE_LR,
                 batch_size: int = 4, max_length: int = 512, probe_steps: int = 1, per_token: bool = True,
                 seed: int = 0):
        import torch

        from ..embedding.embed import decoder_layers

        self.model = model
        blocks = decoder_layers(model)
        n_layers = len(blocks)
        self.layers = tuple(layers) if layers else default_probe_layers(n_layers)
        bad = [x for x in self.layers if not 1 <= x <= n_layers]
        if bad:
            raise SaftError(f"--sap-layers {bad[0]}: this model has layers 1..{n_layers}")
        self.rho = float(rho)
        self.probe_steps = int(probe_steps)
        self.per_token = bool(per_token)
        self.batch_size = min(int(batch_size), len(triples))
        self.pairs = encode_triples(tokenizer, triples, max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lora_params = [p for p in model.parameters() if p.requires_grad]
        if not self.lora_params:
            raise SaftError("SAP needs trainable LoRA weights")
        ref = self.lora_params[0]
        self.device = ref.device
        self.probe = torch.zeros(len(self.layers), int(model.config.hidden_size), device=ref.device,
                                 dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.probe], lr=probe_lr, maximize=True)
        self._seed = seed
        self._calls = 0
        self._mode: str | None = None  # None: probe off; "search": differentiable; "active": constant
        self._handles = [blocks[layer - 1].register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            if self._mode is None:
                return None
            v = self.probe[i] if self._mode == "search" else self.probe[i].detach()
            if isinstance(output, tuple):
                return (output[0] + v.to(output[0].dtype),) + tuple(output[1:])
            return output + v.to(output.dtype)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def probe_active(self) -> Iterator[None]:
        """Add the current probe (as a constant) to the hidden states inside the block."""
        prev, self._mode = self._mode, "active"
        try:
            yield
        finally:
            self._mode = prev

    def next_batch(self, step: int | None = None) -> dict[str, Any]:
        """A batch of triples, drawn by (seed, optimiser step) — or by call number when no step is given —
        so a resumed run draws the same ones."""
        rng = np.random.default_rng([self._seed, self._calls if step is None else int(step)])
        self._calls += 1
        idx = rng.choice(len(self.pairs), size=self.batch_size, replace=False)
        examples = [self.pairs[i][0] for i in idx] + [self.pairs[i][1] for i in idx]
        return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}

    def safety_loss(self, batch: dict[str, Any]) -> Any:
        n = batch["input_ids"].shape[0] // 2
        lp_ref, lp_harm = triple_logprobs(self.model, batch, n, per_token=self.per_token)
        return contrastive_loss(lp_ref, lp_harm)

    def probe_step(self, batch: dict[str, Any] | None = None, *, step: int | None = None) -> dict[str, float]:
        """Steps 1–3: set the probe for the coming task step. LoRA weights are left exactly as found."""
        import torch

        batch = batch if batch is not None else self.next_batch(step)
        was_training = self.model.training
        self.model.eval()
        prev, self._mode = self._mode, "search"
        try:
            with torch.no_grad():
                self.probe.zero_()  # reset each step: the probe answers for the current weights only
            loss0 = self.safety_loss(batch)
            grads = torch.autograd.grad(loss0, self.lora_params + [self.probe], allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for p, x in zip(self.lora_params, grads[:-1])]
            g_norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
            theta_norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in self.lora_params))
            scale = float(self.rho * theta_norm / g_norm) if float(g_norm) > 0 else 0.0
            backup = [p.detach().clone() for p in self.lora_params]

            def shift(sign: float) -> None:
                with torch.no_grad():
                    for p, gi, b in zip(self.lora_params, g, backup):
                        p.copy_(b) if sign == 0 else p.add_(gi.to(p.dtype), alpha=sign * scale)

            grad_norms, gaps = [], []
            try:
                for _ in range(self.probe_steps):
                    # ∂J/∂v with J(v) = L_c(θ+δ, v) − L_c(θ, v); the base term is re-evaluated at the current v
                    if not gaps:
                        base, gv0 = loss0, grads[-1]
                    else:
                        base = self.safety_loss(batch)
                        (gv0,) = torch.autograd.grad(base, [self.probe], allow_unused=True)
                    shift(+1.0)
                    try:
                        shifted = self.safety_loss(batch)
                        (gv1,) = torch.autograd.grad(shifted, [self.probe], allow_unused=True)
                    finally:
                        shift(0.0)
                    gv0 = gv0 if gv0 is not None else torch.zeros_like(self.probe)
                    gv1 = gv1 if gv1 is not None else torch.zeros_like(self.probe)
                    gaps.append(float(shifted.detach() - base.detach()))
                    grad = (gv1 - gv0).detach()
                    grad_norms.append(float(grad.norm()))
                    self.optimizer.zero_grad(set_to_none=True)
                    self.probe.grad = grad
                    self.optimizer.step()  # maximize=True: a step up J
                    self.probe.grad = None
            finally:
                shift(0.0)
        finally:
            self._mode = prev
            self.model.train(was_training)
        return {"sap_safety_loss": round(float(loss0.detach()), 6), "sap_shift_gain": gaps[0],  # J(0)
                "sap_delta_norm": float(scale * g_norm), "sap_probe_grad_norm": grad_norms[0],
                "sap_probe_norm": round(float(self.probe.detach().norm()), 6)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._calls = int(state["calls"])
