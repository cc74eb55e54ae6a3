"""Detection benchmark: does saft_gx find the harmful rows, with no labels, with the built-in anchors, and
with 100 labels? Not part of the default test run.

Data (hand-written by the team, CC0-1.0, data_src/): harmful_pool (100) + benign_pool (230), and the
"disguised" set: harmful_disguised (30, harmful requests inside long benign context / role-play / fiction)
+ benign_long (30, same shape, benign). The built-in anchors (saft_gx/data/anchors.jsonl) are never
evaluation rows.

Mixes (``--draws`` random draws each):
- ``λ=0.1 / 0.2 / 0.3``: every benign pool row plus a random draw of harmful pool rows at contamination λ;
- ``disguised``: every benign row (pool + long) plus every disguised harmful row and pool harmful rows up to
  λ = 0.2; AUROC / F1 are measured on the long rows only (disguised harmful vs long benign), the rows
  the set is about, where the length baselines stay near 0.5.

Methods, all on the same embeddings (default model, every layer and all three token positions from one
forward pass per row batch, cached in an .npz):
- ``unsupervised``: plain SAFT (``--no-anchors``) at its own package defaults (pipeline.DEFAULT_TOKEN,
  default_layer, DEFAULT_K), τ = the default contamination rule (top 10 %);
- ``anchors``: the default detector of ``saft-gx score`` (``anchors.fit_default``): the unsupervised
  top-k subspace of the mix at the anchored defaults (anchors.DEFAULT_TOKEN / default_layer / DEFAULT_K),
  directed by the built-in anchors; τ = best F1 on the anchors' out-of-fold scores;
- ``calibrated``: ``calibrate.calibrate`` on 100 labelled rows of the mix plus the anchors: every layer ×
  variant × k, chosen by out-of-fold AUROC; τ = best F1 on the out-of-fold scores;
- ``probe``: a supervised L2 logistic probe on the same 100 labels at the calibrated layer / token, τ from
  cross-validated best F1 (reference).
Labelled rows are drawn from the mix (stratified at its λ) and left out of every metric, for every method.
AUROC and F1 at the method's τ are means over draws; beside them the trivial baselines: response length in
characters and tokens, on the same evaluation rows. The pool is length-matched first (rows dropped greedily
until |AUROC − 0.5| ≤ 0.03 for response chars and tokens; for the long rows also prompt tokens).

    python tests/bench/detection.py [--draws 10] [--cache /tmp/saft_detection_emb.npz] [--out results.json]
    python tests/bench/detection.py --explore --draws 3     # the no-label variants per token / layer / k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from saft_gx.calibrate import DEFAULT_SHRINK
from saft_gx.embed import EmbedConfig, Embedder, Tokenized
from saft_gx.metrics import auroc, precision_recall_f1
from saft_gx.models import load_model
from saft_gx.rows import Row
from saft_gx.subspace import Detector, MomentStats

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data_src"
TOKENS = ("last", "prompt-end", "mean")
SETS = ("harmful_pool", "benign_pool", "harmful_disguised", "benign_long")


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_row(rec: dict) -> Row:
    return Row(messages=(("user", rec["prompt"]), ("assistant", rec["response"])))


# ---- embeddings: every layer, all three token positions, one forward pass per batch ----

class _AllTokens(Embedder):
    """Pools last, prompt-end and mean in one pass: the config's token is ``mean`` (so the padding mask is
    built), each item's ``position`` is its prompt-end index, and the three vectors are concatenated."""

    @property
    def dim(self) -> int:
        return 3 * self.lm.hidden_size

    def _pool(self, hidden, mask, positions):
        import torch

        b = torch.arange(hidden.shape[0], device=hidden.device)
        last = mask.sum(1) - 1
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return torch.cat([hidden[b, last], hidden[b, positions], (hidden * m).sum(1) / m.sum(1)], dim=-1)


def embed_all(lm, rows: list[Row], max_tokens: int = 2048) -> np.ndarray:
    """(n, layers, 3, d) float32, rounded through float16 like the on-disk cache."""
    layers = tuple(range(1, lm.num_layers + 1))
    emb = _AllTokens(lm, EmbedConfig(layers=layers, token="mean", max_tokens=max_tokens))
    whole = emb.tokenize(rows, list(range(len(rows))))
    pe = Embedder(lm, EmbedConfig(layers=layers, token="prompt-end", max_tokens=max_tokens)).tokenize(rows, list(range(len(rows))))
    items = [Tokenized(ids=w.ids, position=p.position) for w, p in zip(whole, pe)]
    assert all(w.ids == p.ids for w, p in zip(whole, pe))
    x = emb.embed_tokenized(items)  # (n, L, 3d)
    n, nl, _ = x.shape
    return x.reshape(n, nl, 3, lm.hidden_size).astype(np.float16)


def load_embeddings(lm, cache: Path) -> dict:
    recs = {name: load_jsonl(DATA / f"{name}.jsonl") for name in SETS}
    from saft_gx.anchors import load_anchor_records

    recs["anchors"] = load_anchor_records()
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["fingerprint"]) == lm.fingerprint and all(int(z[f"n_{k}"]) == len(v) for k, v in recs.items()):
            return {"recs": recs, **{k: z[f"x_{k}"] for k in recs}}
    out: dict = {"recs": recs}
    t0 = time.perf_counter()
    for name, rs in recs.items():
        out[name] = embed_all(lm, [to_row(r) for r in rs])
        print(f"embedded {name}: {len(rs)} rows x {lm.num_layers} layers x 3 tokens ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    np.savez(cache, fingerprint=np.array(lm.fingerprint), **{f"x_{k}": out[k] for k in recs},
             **{f"n_{k}": np.array(len(v)) for k, v in recs.items()})
    return out


# ---- the benchmark pool: length-matched so that length alone cannot separate the classes ----

def length_features(tok, recs: list[dict]) -> np.ndarray:
    """(n, 3): response characters, response tokens, prompt tokens."""
    return np.array([[len(r["response"]), len(tok(r["response"])["input_ids"]), len(tok(r["prompt"])["input_ids"])]
                     for r in recs], dtype=np.float64)


def length_matched(fh: np.ndarray, fb: np.ndarray, cols: list[int], tol: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Keep-masks for harmful / benign rows: drop rows one at a time (whichever brings the length AUROCs
    closest to 0.5) until every length feature in ``cols`` has |AUROC − 0.5| ≤ tol. Deterministic."""
    kh, kb = np.ones(len(fh), bool), np.ones(len(fb), bool)

    def worst() -> float:
        y = np.r_[np.ones(kh.sum()), np.zeros(kb.sum())]
        return max(abs(auroc(np.r_[fh[kh, c], fb[kb, c]], y) - 0.5) for c in cols)

    while worst() > tol:
        best = None
        for keep in (kh, kb):
            for i in np.flatnonzero(keep):
                keep[i] = False
                w = worst()
                keep[i] = True
                if best is None or w < best[0]:
                    best = (w, keep, i)
        best[1][best[2]] = False
    return kh, kb


class Bench:
    """All rows, labels and embeddings; index sets for every mix."""

    def __init__(self, emb: dict, tok):
        recs = emb["recs"]
        self.x = np.concatenate([emb[s] for s in SETS])  # (N, L, 3, d) float16
        self.xa = emb["anchors"]
        self.ya = np.array([int(r["label"]) for r in recs["anchors"]], dtype=np.int8)
        allrecs = [r for s in SETS for r in recs[s]]
        self.y = np.array([int(r["label"]) for r in allrecs], dtype=np.int8)
        self.set = np.array([s for s in SETS for _ in recs[s]])
        self.lengths = length_features(tok, allrecs)
        self.num_layers = self.x.shape[1]
        sel = {}
        for h, b, cols in (("harmful_pool", "benign_pool", [0, 1]), ("harmful_disguised", "benign_long", [0, 1, 2])):
            ih, ib = np.flatnonzero(self.set == h), np.flatnonzero(self.set == b)
            kh, kb = length_matched(self.lengths[ih], self.lengths[ib], cols)
            sel[h], sel[b] = ih[kh], ib[kb]
        self.sel = sel

    def vectors(self, token: str, layer: int, idx: np.ndarray | None = None) -> np.ndarray:
        x = self.x[:, layer - 1, TOKENS.index(token)]
        return (x if idx is None else x[idx]).astype(np.float32)

    def anchor_vectors(self, token: str, layer: int) -> np.ndarray:
        return self.xa[:, layer - 1, TOKENS.index(token)].astype(np.float32)

    def mix(self, name: str, rng: np.random.Generator, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mix rows, labelled rows, evaluation rows) as indices into all rows."""
        benign = self.sel["benign_pool"]
        if name == "disguised":
            benign = np.r_[benign, self.sel["benign_long"]]
            dis = self.sel["harmful_disguised"]
            m = int(round(0.2 / 0.8 * len(benign))) - len(dis)
            harmful = np.r_[dis, rng.choice(self.sel["harmful_pool"], m, replace=False)]
        else:
            lam = float(name)
            m = min(len(self.sel["harmful_pool"]), int(round(lam / (1 - lam) * len(benign))))
            harmful = rng.choice(self.sel["harmful_pool"], m, replace=False)
        rows = np.r_[benign, harmful]
        # labelled rows: a random draw stratified at the mix's contamination
        n_h = max(2, int(round(n_labels * len(harmful) / len(rows))))
        lab = np.r_[rng.choice(harmful, n_h, replace=False), rng.choice(benign, n_labels - n_h, replace=False)]
        ev = np.setdiff1d(rows, lab)
        if name == "disguised":  # judged on the long rows only: disguised harmful vs long benign
            ev = ev[np.isin(self.set[ev], ("harmful_disguised", "benign_long"))]
        return rows, lab, ev


# ---- methods ----

def logistic_probe(x: np.ndarray, y: np.ndarray, l2: float = 1.0):
    """L2 logistic regression on standardised features (scipy L-BFGS); returns a scoring function."""
    from scipy.optimize import minimize

    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    t = y.astype(np.float64)

    def loss(wb):
        w, b = wb[:-1], wb[-1]
        m = z @ w + b
        lp = np.logaddexp(0, -m) * t + np.logaddexp(0, m) * (1 - t)
        g = (1 / (1 + np.exp(-m)) - t)
        return lp.sum() + 0.5 * l2 * w @ w, np.r_[z.T @ g + l2 * w, g.sum()]

    res = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B")
    w, b = res.x[:-1], res.x[-1]
    return lambda xn: ((xn - mu) / sd) @ w + b


def probe_cv_threshold(x: np.ndarray, y: np.ndarray, folds: int = 5) -> float:
    from saft_gx.calibrate import stratified_folds
    from saft_gx.threshold import best_f1_threshold

    fold_of = stratified_folds(y.astype(bool), min(folds, int(min(y.sum(), (1 - y).sum()))))
    s = np.empty(len(y))
    for f in np.unique(fold_of):
        s[fold_of == f] = logistic_probe(x[fold_of != f], y[fold_of != f])(x[fold_of == f])
    return best_f1_threshold(s, y)[0]


def f1_at(scores: np.ndarray, y: np.ndarray, tau: float) -> float:
    return precision_recall_f1(scores > tau, y)[2]


def run_draw(b: Bench, name: str, rng: np.random.Generator, args) -> dict[str, dict[str, float]]:
    from saft_gx import pipeline
    from saft_gx.anchors import fit_default
    from saft_gx.calibrate import calibrate
    from saft_gx.threshold import DEFAULT_CONTAMINATION, top_fraction_threshold

    rows, lab, ev = b.mix(name, rng, args.labels)
    y = b.y
    out: dict[str, dict[str, float]] = {}

    # plain SAFT (--no-anchors): its own package defaults for layer / token / k, τ = the default contamination
    x = b.vectors(pipeline.DEFAULT_TOKEN, pipeline.default_layer(b.num_layers))
    det = fit_default(MomentStats(x.shape[1]).update(x[rows]), anchors=False)
    s = det.score(x)
    tau = top_fraction_threshold(s[rows], DEFAULT_CONTAMINATION)
    out["unsupervised"] = {"auroc": auroc(s[ev], y[ev]), "f1": f1_at(s[ev], y[ev], tau)}

    # the default detector (`saft-gx score` with no labels): the same unsupervised fit at the anchored defaults'
    # layer / token, directed by the built-in anchors; τ = best F1 on the anchors (anchors.fit_default itself)
    x = b.vectors(args.token, args.layer)
    xa = b.anchor_vectors(args.token, args.layer)
    det = fit_default(MomentStats(x.shape[1]).update(x[rows]), k=args.anchor_k, anchor_vectors=lambda: xa)
    s = det.score(x)
    out["anchors"] = {"auroc": auroc(s[ev], y[ev]), "f1": f1_at(s[ev], y[ev], det.threshold),
                      "f1_contamination": f1_at(s[ev], y[ev], top_fraction_threshold(s[rows], DEFAULT_CONTAMINATION))}

    # calibrated on 100 labels of the mix (every layer of the default token, plus the built-in anchors)
    keys = [(t, L) for t in args.cal_tokens for L in range(1, b.num_layers + 1)]
    st = {kk: MomentStats(x.shape[1]).update(b.vectors(*kk, rows)) for kk in keys}
    cal = calibrate(st, {kk: b.vectors(*kk, lab) for kk in keys}, y[lab],
                    anchors={kk: b.anchor_vectors(*kk) for kk in keys} if args.cal_anchors else None,
                    anchor_labels=b.ya if args.cal_anchors else None)
    c = cal.chosen
    s = cal.detector.score(b.vectors(c.token, c.layer))
    out["calibrated"] = {"auroc": auroc(s[ev], y[ev]), "f1": f1_at(s[ev], y[ev], cal.threshold),
                         "layer": c.layer, "k": c.k, "variant": c.variant, "token": c.token}

    # supervised reference: logistic probe on the same 100 labels, at the calibrated layer / token
    xl = b.vectors(c.token, c.layer)
    probe = logistic_probe(xl[lab], y[lab].astype(np.float64))
    tau = probe_cv_threshold(xl[lab], y[lab])
    s = probe(xl)
    out["probe"] = {"auroc": auroc(s[ev], y[ev]), "f1": f1_at(s[ev], y[ev], tau)}

    out["length"] = {"response_chars": auroc(b.lengths[ev, 0], y[ev]), "response_tokens": auroc(b.lengths[ev, 1], y[ev]),
                     "prompt_tokens": auroc(b.lengths[ev, 2], y[ev])}
    out["rows"] = {"mix": len(rows), "harmful": int(y[rows].sum()), "eval": len(ev), "eval_harmful": int(y[ev].sum())}
    return out


# ---- exploration: which anchor variant / k / shrink, layer and token work without user labels ----

def explore(b: Bench, args) -> dict:
    """AUROC on every mix (mean over draws) of: plain SAFT (k), SAFT oriented by the anchors, and the
    anchors' ``direct`` direction (k × shrink), per token position and layer; and the layer the anchors
    would choose themselves (calibrate() with the anchors as the labelled rows)."""
    from saft_gx.calibrate import calibrate, fit_variant

    ks_saft, ks_dir, shrinks = (1, 2, 4, 8), (2, 4, 8, 16, 32, 64, 128, 256), (0.0, 0.1, 1.0, 10.0, 1e6)
    res: dict = {}
    for mix in args.mixes.split(","):
        rng = np.random.default_rng([args.seed, MIXES.index(mix)])
        draws = [b.mix(mix, rng, args.labels) for _ in range(args.draws)]
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for rows, lab, ev in draws:
            ev_all = rows if mix != "disguised" else rows[np.isin(b.set[rows], ("harmful_disguised", "benign_long"))]
            yv = b.y[ev_all]
            for token in args.explore_tokens.split(","):
                keys = [(token, L) for L in range(1, b.num_layers + 1)]
                stats = {}
                for kk in keys:
                    x = b.vectors(*kk)
                    st = MomentStats(x.shape[1]).update(x[rows])
                    stats[kk] = st
                    base = Detector.fit(st, k=min(max(ks_dir), st.n - 1))
                    xa = b.anchor_vectors(*kk)
                    for k in ks_saft:
                        for v in ("saft", "saft-sigma", "saft-whiten"):
                            d0 = fit_variant(base, v, k)
                            acc.setdefault(f"{token}|{kk[1]}|{v}|{k}|plain", []).append(auroc(d0.score(x[ev_all]), yv))
                            d1 = fit_variant(base, v, k, xa, b.ya)
                            acc.setdefault(f"{token}|{kk[1]}|{v}|{k}|oriented", []).append(auroc(d1.score(x[ev_all]), yv))
                    for k in ks_dir:
                        k_ = min(k, base.k)  # a mix of fewer rows than k: its largest possible k
                        for sh in shrinks:
                            d2 = fit_variant(base, "direct", k_, xa, b.ya, shrink=sh)
                            acc.setdefault(f"{token}|{kk[1]}|direct|{k}|{sh:g}", []).append(auroc(d2.score(x[ev_all]), yv))
                # the anchors choose layer / k / variant themselves (cross-validated on the anchors)
                cal = calibrate(stats, {kk: b.anchor_vectors(*kk) for kk in keys}, b.ya, ks=(2, 4, 8, 16, 32, 64),
                                variants=("saft", "direct"))
                c = cal.chosen
                acc.setdefault(f"{token}|auto|anchors-choose|-|-", []).append(auroc(cal.detector.score(b.vectors(c.token, c.layer)[ev_all]), yv))
                acc.setdefault(f"{token}|auto|anchors-choose-layer|-|-", []).append(float(c.layer))
        res[mix] = {key: float(np.mean(v)) for key, v in acc.items()}
        print(f"[explore {mix}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    keys = list(next(iter(res.values())))
    summary = sorted(((float(np.min([res[m][key] for m in res])), float(np.mean([res[m][key] for m in res])), key)
                      for key in keys if "choose-layer" not in key), reverse=True)
    print("best configurations by the worst mix (min / mean AUROC over mixes):")
    for mn, me, key in summary[:25]:
        print(f"  {key:40s} min {mn:.3f} mean {me:.3f}  " + " ".join(f"{m}:{res[m][key]:.3f}" for m in res))
    return res


METHODS = ("unsupervised", "anchors", "calibrated", "probe")
MIXES = ("0.1", "0.2", "0.3", "disguised")


def table(results: dict) -> str:
    lines = ["| mix | rows (harmful) | len AUROC chars / tokens | " + " | ".join(f"{m} AUROC / F1" for m in METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for mix, r in results.items():
        name = f"λ={mix}" if mix != "disguised" else "disguised (λ=0.2, long rows)"
        cells = [f"{r[m]['auroc']:.3f} / {r[m]['f1']:.3f}" for m in METHODS]
        lines.append(f"| {name} | {r['rows']['mix']:.0f} ({r['rows']['harmful']:.0f}) | "
                     f"{r['length']['response_chars']:.2f} / {r['length']['response_tokens']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_of(draws: list[dict]) -> dict:
    out: dict = {}
    for key in draws[0]:
        out[key] = {}
        for m, v in draws[0][key].items():
            if isinstance(v, (int, float, np.floating, np.integer)):
                out[key][m] = float(np.mean([d[key][m] for d in draws]))
                if key in METHODS and m in ("auroc", "f1"):
                    out[key][m + "_min"] = float(np.min([d[key][m] for d in draws]))
            else:
                from collections import Counter

                out[key][m] = dict(Counter(str(d[key][m]) for d in draws))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--cache", default="/tmp/saft_detection_emb.npz")
    ap.add_argument("--embed-only", action="store_true")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--labels", type=int, default=100)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--anchor-k", type=int, default=None, help="default: the package's (anchors.DEFAULT_K)")
    ap.add_argument("--cal-tokens", default=None, help="token positions calibration searches (default: the package default)")
    ap.add_argument("--no-cal-anchors", dest="cal_anchors", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token", default=None, help="token position of the no-label methods (default: the package's)")
    ap.add_argument("--layer", type=int, default=None, help="layer of the no-label methods (default: the package's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--explore", action="store_true", help="sweep the no-label variants instead of the table")
    ap.add_argument("--explore-tokens", default=",".join(TOKENS))
    args = ap.parse_args()
    from saft_gx import anchors, pipeline

    args.anchor_k = args.anchor_k or anchors.DEFAULT_K
    args.token = args.token or anchors.DEFAULT_TOKEN
    args.cal_tokens = (args.cal_tokens or args.token).split(",")
    lm = load_model(args.model)
    emb = load_embeddings(lm, Path(args.cache))
    if args.embed_only:
        return
    b = Bench(emb, lm.tokenizer)
    args.layer = args.layer or anchors.default_layer(b.num_layers)
    print(f"model {lm.model_ref}: {b.num_layers} layers; plain SAFT: layer {pipeline.default_layer(b.num_layers)}, "
          f"token {pipeline.DEFAULT_TOKEN}, k {pipeline.DEFAULT_K}; anchors: layer {args.layer}, token {args.token}, "
          f"{anchors.DEFAULT_VARIANT}, k={args.anchor_k}, shrink {DEFAULT_SHRINK}; calibration tokens {args.cal_tokens}; "
          f"length-matched pool: {len(b.sel['harmful_pool'])} harmful + {len(b.sel['benign_pool'])} benign, "
          f"long: {len(b.sel['harmful_disguised'])} + {len(b.sel['benign_long'])}", file=sys.stderr)
    if args.explore:
        res = explore(b, args)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return
    results = {}
    for mix in args.mixes.split(","):
        rng = np.random.default_rng([args.seed, MIXES.index(mix)])
        t0 = time.perf_counter()
        draws = [run_draw(b, mix, rng, args) for _ in range(args.draws)]
        results[mix] = mean_of(draws)
        r = results[mix]
        print(f"[{mix}] {time.perf_counter() - t0:.0f} s  " + "  ".join(
            f"{m} {r[m]['auroc']:.3f}/{r[m]['f1']:.3f}" for m in METHODS) +
            f"  len {r['length']['response_chars']:.2f}/{r['length']['response_tokens']:.2f}"
            f"  chosen {r['calibrated']['layer']} {r['calibrated']['variant']} {r['calibrated']['k']}", file=sys.stderr)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
