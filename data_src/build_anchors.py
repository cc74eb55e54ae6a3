"""Build saft_gx/data/anchors.jsonl.gz, the built-in anchors, from the team-written rows in data_src/.

    python data_src/build_anchors.py

Sources (all CC0-1.0, written by the saft_gx team; see data_src/README.md): data_src/anchors/*.jsonl and the
first release's 48 anchors (harmful_anchors.jsonl, benign_anchors.jsonl). The evaluation pools of
tests/bench/detection.py (harmful_pool, benign_pool, harmful_disguised, benign_long) are never anchors.
Deterministic output (sorted sources, gzip mtime 0), so a rebuild without changes is byte-identical.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT.parent / "saft_gx" / "data" / "anchors.jsonl.gz"
KEYS = ("prompt", "response", "label", "category", "framing", "lang")


EVALUATION = ("harmful_pool", "benign_pool", "harmful_disguised", "benign_long")


def evaluation_prompts() -> set[str]:
    """Prompts of the detection benchmark's own held-out rows: never anchors, even when written alike."""
    out = set()
    for name in EVALUATION:
        out |= {json.loads(line)["prompt"].strip().lower() for line in (ROOT / f"{name}.jsonl").read_text().splitlines()
                if line.strip()}
    return out


def records() -> list[dict]:
    out, seen, held_out = [], set(), evaluation_prompts()
    files = sorted((ROOT / "anchors").glob("*.jsonl")) + [ROOT / "harmful_anchors.jsonl", ROOT / "benign_anchors.jsonl"]
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not str(r.get("prompt", "")).strip() or not str(r.get("response", "")).strip() or r.get("label") not in (0, 1):
                raise SystemExit(f"{f.name}:{n}: needs a prompt, a response and a 0/1 label")
            if r["prompt"] in seen or r["prompt"].strip().lower() in held_out:
                continue
            seen.add(r["prompt"])
            r.setdefault("framing", "plain")
            r.setdefault("lang", "en")
            r["source"] = f.name
            out.append({k: r.get(k) for k in (*KEYS, "source")})
    return out


def main() -> None:
    recs = records()
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs).encode("utf-8")
    tmp = OUT.with_suffix(".tmp")
    with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(data)
    tmp.replace(OUT)
    harmful = sum(r["label"] for r in recs)
    print(f"{OUT.name}: {len(recs)} rows ({harmful} harmful, {len(recs) - harmful} benign), "
          f"{OUT.stat().st_size / 1024:.0f} KiB (from {len(data) / 1024:.0f} KiB of JSON)")


if __name__ == "__main__":
    main()
