"""Detection benchmark: does the default detector find harmful rows it was never shown, with no labels, and
with 100 labels? Prints the tables the README quotes. Not part of the default test run.

    # a labelled prompt/response parquet written by others (columns prompt, response, label; optional variant
    # `matched`/`original`/`restate`/`template_only` and source), e.g. a development set kept outside the repo:
    python tests/bench/detection.py --data PATH/devset.parquet --half 1
    # our own held-out rows (data_src/ pools, never anchors):
    python tests/bench/detection.py

Honesty rules it follows:
- **Held out by request.** Rows are split into two halves by a hash of the prompt; settings were chosen on half
  0 and the README reports half 1 (``--half``). The built-in anchors are never evaluation rows.
- **Mixes** of ``--rows`` rows at contamination λ ∈ {0.05, 0.1, 0.2, 0.3} × ``--seeds`` seeds, plus clean sets
  (λ = 0). With ``variant`` columns: ``matched`` = harmful (``restate``) vs benign requests answered by the
  *same* answer generator (only the request differs), and ``realchat`` = harmful (both variants) vs real chat
  rows. Without: harmful vs benign rows of the file.
- **Trivial baseline** beside every AUROC: the response length in characters (AUROC of length alone, oriented
  as measured; 0.5 = no signal, far from 0.5 either way = the classes differ by length).
- The **default** detector is exactly ``anchors.fit_default`` on the mix's own statistics and rows (layers 12, 18
  and 24 side by side: the data's SAFT subspace of layer 18 + the built-in anchors, adapted to the mix, blended
  with the whole-state probe and that blend adapted to the mix's benign rows; τ = the default probability),
  **plain SAFT** is the paper's unsupervised score on the layer-18 vectors (``--no-anchors`` scores whole rows
  at its own layer/token),
  **calibrated** is ``calibrate.calibrate`` as ``saft-gx calibrate`` runs it by default (``probe-fused`` on
  layers 12, 18 and 24 side by side, its prior being the default detector above) on 100 labelled rows drawn
  from the mix (left out of its metrics); ``--calibrate-search`` also tries those layers one by one and
  ``probe-full`` (``saft-gx calibrate --layers 12,18,24 --variants probe-full,probe-fused``).

Vectors come from saft_gx's own embedding path and cache (``Session`` at the package defaults). The
default reads the prompt-end token, whose state does not depend on the response (causal model), so rows that
share a prompt are embedded once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from saft_gx.core import defaults
from saft_gx.detect.anchors import anchor_rows, fit_default
from saft_gx.detect.calibrate import ThresholdTarget, calibrate, prior_in
from saft_gx.core.metrics import auroc, precision_recall_f1
from saft_gx.pipeline import EmbedOptions, Session, embed_into_cache
from saft_gx.embedding.rows import Row
from saft_gx.core.subspace import Detector, MomentStats

ROOT = Path(__file__).resolve().parents[2]
LAMBDAS = (0.05, 0.1, 0.2, 0.3)
DEFAULT_LAYER = defaults.layer_for(30)  # SmolLM2-135M has 30 layers; the default probe's subspace layer
STACK = defaults.stack_for(30)  # the layers the default detector (and calibrate) read side by side
DEFAULT_META = {"layers": list(STACK), "subspace_layer": DEFAULT_LAYER}


def half_of(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % 2


def own_rows() -> pd.DataFrame:
    """Our held-out rows: the first release's evaluation pools (never anchors)."""
    recs = []
    for name, label in (("harmful_pool", 1), ("harmful_disguised", 1), ("benign_pool", 0), ("benign_long", 0)):
        for line in (ROOT / "data_src" / f"{name}.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recs.append({"prompt": r["prompt"], "response": r["response"], "label": label,
                             "source": r.get("category", name), "variant": name})
    return pd.DataFrame(recs)


def embed_prompts(session: Session, prompts: list[str]) -> dict[int, np.ndarray]:
    """Every prompt's vectors at each of the session's layers (one forward pass, through the cache)."""
    rows = [Row(messages=(("user", p), ("assistant", "."))) for p in prompts]
    keys = embed_into_cache(session.embedder, session.cache, rows)
    return {layer: session.cache.layer(layer).get(keys).astype(np.float64) for layer in session.layers}


def mix_pools(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    if "variant" in df and {"matched", "original", "restate"} <= set(df["variant"]):
        return {"matched": (df[df.variant == "restate"], df[df.variant == "matched"]),
                "realchat": (df[df.label == 1], df[df.variant == "original"])}
    return {"all": (df[df.label == 1], df[df.label == 0])}


def draw(harm: pd.DataFrame, benign: pd.DataFrame, lam: float, n: int, rng: np.random.Generator) -> pd.DataFrame:
    nh = int(round(lam * n))
    nb = n - nh
    if nh > len(harm) or nb > len(benign):  # a small pool: keep λ, shrink the mix
        scale = min(len(harm) / max(nh, 1), len(benign) / max(nb, 1))
        nh, nb = int(nh * scale), int(nb * scale)
    parts = [harm.iloc[rng.choice(len(harm), nh, replace=False)]] if nh else []
    parts.append(benign.iloc[rng.choice(len(benign), nb, replace=False)])
    return pd.concat(parts)  # keeps df's index: the rows' positions in the embedded matrix


def evaluate(xs: dict[int, np.ndarray], y: np.ndarray, resp_len: np.ndarray, anchors_x: np.ndarray, ya: np.ndarray,
             rng: np.random.Generator, *, with_calibration: bool, calibrate_search: bool = False) -> dict:
    x = np.hstack([xs[layer] for layer in STACK])
    stats = MomentStats(x.shape[1]).update(x)
    det = fit_default(stats, anchor_vectors=lambda: anchors_x, meta=DEFAULT_META, data_coords=lambda d: d.project(x),
                      data_rows=lambda idx: x[idx])
    s = det.score(x)
    unadapted = fit_default(stats, anchor_vectors=lambda: anchors_x, meta=DEFAULT_META, adapt=False).score(x)
    flags = s > det.threshold
    x1 = xs[DEFAULT_LAYER]
    plain = fit_default(MomentStats(x1.shape[1]).update(x1), anchors=False).score(x1)
    out = {"n": len(y), "harmful": int(y.sum()), "flagged": float(flags.mean()), "flags": flags}
    if y.any() and not y.all():
        p, r, f1 = precision_recall_f1(flags, y.astype(bool))
        length = auroc(resp_len, y)
        # the baseline at its best orientation: a benchmark where "shorter answer = harmful" works is not fair
        out.update(auroc=auroc(s, y), f1=f1, precision=p, recall=r, plain=auroc(plain, y), length=max(length, 1 - length),
                   unadapted=auroc(unadapted, y))
        if with_calibration:
            out["calibrated"] = calibrated_auroc(xs, det, y, rng, search=calibrate_search)
    return out


def calibrated_auroc(xs: dict[int, np.ndarray], default: Detector, y: np.ndarray, rng: np.random.Generator,
                     n_labels: int = 100, search: bool = False) -> float:
    """AUROC on the rows left after 100 random labelled rows were used by ``saft-gx calibrate`` (its default: the
    stack, probe-fused) or, with ``search``, ``--layers 12,18,24 --variants probe-full,probe-fused``. On the
    development half the search lost 0.003–0.004 to the stack alone, and searching every variant 0.019 on
    ``matched`` (a subspace probe won on some draws: ~20 harmful labels make the choice noisy)."""
    while True:
        lab = rng.choice(len(y), n_labels, replace=False)
        if 2 <= y[lab].sum() <= n_labels - 2:
            break
    tok = defaults.TOKEN
    vectors = {(tok, layer): x for layer, x in xs.items()}
    vectors[(tok, STACK)] = np.hstack([xs[layer] for layer in STACK])
    if not search:
        vectors = {(tok, STACK): vectors[(tok, STACK)]}
    stats = {key: MomentStats(x.shape[1]).update(x) for key, x in vectors.items()}
    priors = {key: prior_in(key[1], default.direction(), STACK) for key in vectors}
    priors = {key: w for key, w in priors.items() if w is not None}
    cal = calibrate(stats, {key: x[lab] for key, x in vectors.items()}, y[lab],
                    variants=("probe-full", "probe-fused") if search else ("probe-fused",),
                    target=ThresholdTarget("f1"), priors=priors)
    rest = np.setdiff1d(np.arange(len(y)), lab)
    return auroc(cal.detector.score(vectors[(tok, cal.chosen.layer)][rest]), y[rest])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="labelled prompt/response parquet or jsonl (default: our data_src pools)")
    ap.add_argument("--half", type=int, choices=(0, 1), default=1, help="which half of the requests to report on")
    ap.add_argument("--all-rows", action="store_true", help="use both halves (our own pools are small)")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--calibrate-search", action="store_true", help="calibrated: search layers 12, 18, 24 and the "
                    "stack × probe-full, probe-fused instead of the default (the stack, probe-fused)")
    ap.add_argument("--json", help="also write the per-mix results here")
    ap.add_argument("--tau", type=float, help="report flags at this probability instead of the default τ")
    ap.add_argument("--blend-weight", type=float, help="the whole-state probe's share in the default detector "
                    f"(default {defaults.BLEND_WEIGHT:g}; 0: the subspace probe alone)")
    ap.add_argument("--blend-c", type=float, help=f"the whole-state probe's inverse ridge strength (default {defaults.BLEND_C:g})")
    ap.add_argument("--no-adapt-whole", action="store_true", help="the default without adapting the blend to the "
                    "data's benign rows in the whole state (the default before this option)")
    ap.add_argument("--no-neighbours", action="store_true", help="the default without lowering the rows whose nearest "
                    "data rows score low (saft_gx/core/neighbours.py; the default before this option)")
    ap.add_argument("--neighbours-both", action="store_true", help="each row moved both ways by its nearest data rows' "
                    "scores and Platt-scaled again on the anchors (measured, not the default)")
    ap.add_argument("--k", type=int, help=f"the default probe's subspace size (default {defaults.K})")
    args = ap.parse_args(argv)
    if args.blend_c is not None:
        defaults.BLEND_C = args.blend_c
    if args.k is not None:
        defaults.K = args.k
    if args.no_adapt_whole:
        defaults.ADAPT_WHOLE = False
    if args.no_neighbours:
        defaults.NEIGHBOURS = False
    if args.neighbours_both:
        defaults.NEIGHBOURS_DOWN_ONLY = False
    if args.tau is not None:
        defaults.PROBABILITY_THRESHOLD = args.tau  # fit_default reads it at call time
    if args.blend_weight is not None:
        defaults.BLEND_WEIGHT = args.blend_weight

    t0 = time.perf_counter()
    if args.data:
        df = pd.read_parquet(args.data) if args.data.endswith(".parquet") else pd.read_json(args.data, lines=True)
        name = Path(args.data).name
    else:
        df, name = own_rows(), "data_src pools (ours, held out from the anchors)"
    df = df.dropna(subset=["prompt", "response", "label"]).reset_index(drop=True)
    df["label"] = df["label"].astype(int)
    if "source" not in df:
        df["source"] = "all"
    if not args.all_rows:
        df = df[df.prompt.map(half_of) == args.half].reset_index(drop=True)

    session = Session(EmbedOptions(layers=STACK))
    if session.lm.num_layers != 30:
        raise SystemExit("the benchmark's layers are the default model's (30 layers)")
    prompts = list(dict.fromkeys(df.prompt))
    vec = embed_prompts(session, prompts)
    index = [{p: i for i, p in enumerate(prompts)}[p] for p in df.prompt]
    XS = {layer: v[index] for layer, v in vec.items()}
    X = np.hstack([XS[layer] for layer in STACK])
    arows, ya = anchor_rows()
    av = embed_prompts(session, [r.messages[0][1] for r in arows])
    A = np.hstack([av[layer] for layer in STACK])
    y_all = df.label.to_numpy()
    resp_len = df.response.str.len().to_numpy()
    print(f"data {name}: {len(df)} rows ({'both halves' if args.all_rows else f'half {args.half}'}), "
          f"{len(prompts)} prompts; anchors {len(ya)}; model {session.lm.model_ref}, layers {'+'.join(map(str, STACK))} "
          f"(subspace {DEFAULT_LAYER}), "
          f"token {session.config.token}, k {defaults.K}, τ = p > {defaults.PROBABILITY_THRESHOLD:g}; "
          f"embedded in {time.perf_counter() - t0:.0f} s")

    results = []
    cats: dict[str, list[int]] = {}
    for mix, (harm, benign) in mix_pools(df).items():
        for lam in LAMBDAS:
            for seed in range(args.seeds):
                rng = np.random.default_rng(1000 * seed + int(lam * 100))
                m = draw(harm, benign, lam, args.rows, rng)
                sel = m.index.to_numpy()
                r = evaluate({layer: x[sel] for layer, x in XS.items()}, y_all[sel], resp_len[sel], A, ya, rng,
                             with_calibration=not args.no_calibration,
                             calibrate_search=args.calibrate_search)
                r.update(mix=mix, lam=lam, seed=seed)
                results.append(r)
                for src, f, lab in zip(m.source, r.pop("flags"), m.label):
                    if lab == 1:
                        cats.setdefault(str(src), []).append(int(f))
        for seed in range(args.seeds):
            rng = np.random.default_rng(7000 + seed)
            m = draw(harm, benign, 0.0, args.rows, rng)
            sel = m.index.to_numpy()
            stats = MomentStats(X.shape[1]).update(X[sel])
            xs = X[sel]
            det = fit_default(stats, anchor_vectors=lambda: A, meta=DEFAULT_META, data_coords=lambda d: d.project(xs),
                              data_rows=lambda idx: xs[idx])
            results.append({"mix": mix, "lam": 0.0, "seed": seed, "n": len(sel), "harmful": 0,
                            "flagged": float((det.score(X[sel]) > det.threshold).mean())})
    res = pd.DataFrame(results)
    print_tables(res, cats, args.seeds)
    if args.json:
        res.to_json(args.json, orient="records", indent=1)
    print(f"total {time.perf_counter() - t0:.0f} s")


def print_tables(res: pd.DataFrame, cats: dict[str, list[int]], seeds: int) -> None:
    print(f"\nmean over {seeds} seeds (min in brackets); AUROC of the default detector, of the anchors' probe before "
          "it is adapted to the data (--no-adapt), plain SAFT (unsupervised, same vectors), calibrated (100 labels, "
          "rows left out), and response length alone (max(AUROC, 1 − AUROC))")
    print("| mix | λ | default AUROC (min) | F1 | flagged (λ) | --no-adapt AUROC | plain SAFT AUROC | calibrated (100 labels) "
          "| length AUROC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mix, lam), g in res.groupby(["mix", "lam"], sort=True):
        if lam == 0:
            continue
        cal = (f"{g.calibrated.mean():.3f} ({g.calibrated.min():.3f})" if "calibrated" in g and g.calibrated.notna().any()
               else "–")
        print(f"| {mix} | {lam:g} | {g.auroc.mean():.3f} ({g.auroc.min():.3f}) | {g.f1.mean():.2f} | "
              f"{g.flagged.mean():.3f} ({lam:g}) | {g.unadapted.mean():.3f} | {g.plain.mean():.3f} | {cal} | "
              f"{g.length.mean():.3f} |")
    clean = res[res.lam == 0]
    for mix, g in clean.groupby("mix"):
        print(f"| {mix}, clean | 0 | – | – | {g.flagged.mean():.3f} (max {g.flagged.max():.3f}) | – | – | – | – |")
    gate = 0.02  # expectations/release_gate.json: at most 2 % of rows flagged
    print(f"\nrelease gate (flagged ≤ {gate:.0%} at the default τ) passes:")
    for (mix, lam), g in res.groupby(["mix", "lam"], sort=True):
        print(f"  {mix}, λ = {lam:g}: {(g.flagged <= gate).sum()} of {len(g)} draws")
    print("\nrecall at the default τ by harm category (harmful rows over all mixes):")
    for src, v in sorted(cats.items(), key=lambda kv: -len(kv[1])):
        print(f"  {src}: {np.mean(v):.2f} ({len(v)} rows)")


if __name__ == "__main__":
    sys.exit(main())
