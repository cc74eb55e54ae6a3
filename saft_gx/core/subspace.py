"""SAFT's statistics, fit and score: pure NumPy, no I/O besides explicit save/load.

The fit never needs the n×d embedding matrix. The covariance of centred embeddings is
C = (Σxxᵀ − n·μμᵀ) / n, and its eigenvectors are the right singular vectors of the centred matrix, so
three running sums (count, Σx, Σxxᵀ, in float64) are enough — and sums merge across shards and machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SaftError
from .neighbours import Neighbours
from .outputs import file_mode

WEIGHTINGS = ("none", "sigma", "whiten")
FORMS = ("squared", "linear")
LINKS = ("identity", "logistic")


@dataclass
class MomentStats:
    """Running count, sum and sum of outer products of vectors. ``merge`` is exact and associative."""

    dim: int
    n: int = 0
    sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = np.zeros(self.dim, dtype=np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, x: np.ndarray) -> "MomentStats":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {x.shape}")
        if not np.isfinite(x).all():
            raise SaftError("the model produced non-finite hidden states (inf/NaN); try fp32 (--dtype float32)")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "MomentStats") -> "MomentStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return MomentStats(self.dim, self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    def columns(self, start: int, stop: int) -> "MomentStats":
        """The statistics of columns ``start:stop`` of the vectors (one layer of a stack), exactly."""
        if not 0 <= start < stop <= self.dim:
            raise ValueError(f"columns {start}:{stop} of {self.dim}")
        return MomentStats(stop - start, self.n, self.sum[start:stop].copy(), self.outer[start:stop, start:stop].copy())

    def covariance(self) -> np.ndarray:
        """Population covariance (divided by n), symmetrised against rounding."""
        if self.n < 2:
            raise SaftError(f"need at least 2 rows to fit a detector, got {self.n}")
        mu = self.mean
        c = self.outer / self.n - np.outer(mu, mu)
        return (c + c.T) / 2

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}n": np.array([self.n], dtype=np.int64), f"{prefix}sum": self.sum, f"{prefix}outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> "MomentStats":
        s = arrays[f"{prefix}sum"]
        return cls(s.shape[0], int(arrays[f"{prefix}n"][0]), s.astype(np.float64), arrays[f"{prefix}outer"].astype(np.float64))


@dataclass(frozen=True)
class Detector:
    """A fitted SAFT subspace: score(x) = orientation · Σ_j w_j ⟨x − μ, v_j⟩² (form ``squared``, the paper's
    score with w_j = 1/k), or orientation · Σ_j w_j ⟨x − μ, v_j⟩ (form ``linear``: a signed direction inside
    the subspace, chosen from labelled rows or the built-in anchors; see ``saft_gx.detect.calibrate``).

    mean: (d,) centre μ of the fitted embeddings.
    components: (k, d) top eigenvectors v_j of the covariance, largest first.
    singular_values: (k,) σ_j of the centred n×d matrix (= sqrt(n·eigenvalue)).
    weighting: ``none`` (w_j = 1/k, the paper's score), ``sigma`` (w_j = σ_j / Σσ, emphasising the top
        direction) or ``whiten`` (w_j ∝ 1/σ_j², every direction counts in its own units: a Mahalanobis
        distance inside the subspace). Ignored when ``coef`` is set.
    form: ``squared`` or ``linear`` (see above).
    coef: (k,) explicit w_j, or None to derive them from ``weighting``. Required for ``linear``.
    orientation: +1 when large scores mean harmful (the default); −1 flips it when labels show the opposite.
    threshold: τ; rows with score > τ are flagged. None until chosen.
    meta: the embedding it belongs to (model fingerprint, layer, token, …) and provenance.
    intercept, link: for ``linear`` detectors, score = link(orientation · Σ_j w_j ⟨x − μ, v_j⟩ + intercept);
        ``logistic`` makes the score a probability of harm (a logistic probe fitted on labelled rows).
    neighbours: for ``linear`` detectors, what a row's nearest rows of the fitted dataset add to its score before
        the link (``saft_gx.core.neighbours``); None: each row is scored alone.
    """

    mean: np.ndarray
    components: np.ndarray
    singular_values: np.ndarray
    weighting: str = "none"
    orientation: int = 1
    threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    form: str = "squared"
    coef: np.ndarray | None = None
    intercept: float = 0.0
    link: str = "identity"
    neighbours: Neighbours | None = None

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise SaftError(f"form {self.form!r}: choose one of {', '.join(FORMS)}")
        if self.weighting not in WEIGHTINGS:
            raise SaftError(f"weighting {self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if self.coef is not None and np.shape(self.coef) != (self.k,):
            raise SaftError(f"coef has shape {np.shape(self.coef)}, expected ({self.k},)")
        if self.link not in LINKS:
            raise SaftError(f"link {self.link!r}: choose one of {', '.join(LINKS)}")
        if self.form == "linear" and self.coef is None:
            raise SaftError("a linear detector needs coef (one signed weight per direction)")
        if self.neighbours is not None and (self.form != "linear" or self.neighbours.basis.shape[1] != self.dim):
            raise SaftError("neighbours belong to a linear detector of the same embedding size")

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, stats: MomentStats, *, k: int = 1, weighting: str = "none", meta: dict[str, Any] | None = None) -> "Detector":
        if weighting not in WEIGHTINGS:
            raise SaftError(f"weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if not 1 <= k <= stats.dim:
            raise SaftError(f"k={k}: must be between 1 and the embedding size {stats.dim}")
        if k >= stats.n:
            raise SaftError(f"k={k} directions need more than {k} rows; got {stats.n}")
        evals, evecs = np.linalg.eigh(stats.covariance())
        top = np.argsort(evals)[::-1][:k]
        comps = evecs[:, top].T.copy()
        # eigenvector signs are arbitrary; fix them so a refit gives bit-identical artifacts
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
        comps *= signs[:, None]
        sv = np.sqrt(np.clip(evals[top], 0, None) * stats.n)
        m = dict(meta or {})
        m.setdefault("n", stats.n)
        return cls(mean=stats.mean.copy(), components=comps, singular_values=sv, weighting=weighting, meta=m)

    def widened(self, mean: np.ndarray, start: int) -> "Detector":
        """This detector, fitted on columns ``start:start + dim`` of wider vectors (one layer of a stack), reading
        the wider vectors: ``mean`` is their centre, the other columns get no weight, the scores are the same."""
        mean = np.asarray(mean, dtype=np.float64)
        if not 0 <= start <= len(mean) - self.dim:
            raise SaftError(f"columns {start}:{start + self.dim} do not fit in vectors of size {len(mean)}")
        comps = np.zeros((self.k, len(mean)))
        comps[:, start : start + self.dim] = self.components
        return self.with_(mean=mean.copy(), components=comps)

    def _weights(self) -> np.ndarray:
        if self.coef is not None:
            return np.asarray(self.coef, dtype=np.float64)
        if self.weighting == "whiten":
            inv = 1.0 / np.maximum(self.singular_values, 1e-12 * max(float(self.singular_values.max()), 1e-300)) ** 2
            return inv / inv.sum()
        if self.weighting == "sigma":
            total = self.singular_values.sum()
            return self.singular_values / total if total > 0 else np.full(self.k, 1.0 / self.k)
        return np.full(self.k, 1.0 / self.k)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, k) coordinates ⟨x − μ, v_j⟩ of (n, d) vectors in the subspace, float64."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise SaftError(f"embedding size {x.shape[-1]} does not match the detector's {self.dim}")
        return (x - self.mean) @ self.components.T

    def direction(self) -> np.ndarray:
        """(d,) w with score = link(⟨x − μ, w⟩ + intercept): the direction a linear detector reads (plus what its
        ``neighbours`` add, when it has them)."""
        if self.form != "linear":
            raise SaftError("only a linear detector has one direction")
        return self.orientation * (self.components.T @ self._weights())

    def score(self, x: np.ndarray) -> np.ndarray:
        """Harm scores of (n, d) vectors, float64; higher = more likely harmful."""
        proj = self.project(x)
        if self.form == "linear":
            z = self.orientation * (proj @ self._weights()) + self.intercept
            if self.neighbours is not None:
                z = z + self.neighbours.lift(np.asarray(x, dtype=np.float64) - self.mean)
            return np.exp(-np.logaddexp(0.0, -z)) if self.link == "logistic" else z
        return self.orientation * (proj**2 @ self._weights())

    def flag(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise SaftError("the detector has no threshold; pass --threshold, --remove-fraction or --contamination")
        return np.asarray(scores) > self.threshold

    def with_(self, **changes: Any) -> "Detector":
        return replace(self, **changes)

    # ---- identity and persistence (safetensors + JSON; never pickle) ----

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "dim": self.dim,
            "weighting": self.weighting,
            "orientation": self.orientation,
            "threshold": self.threshold,
            "form": self.form,
            **({"intercept": self.intercept, "link": self.link} if self.link != "identity" or self.intercept else {}),
            **({"neighbours_k": self.neighbours.k, "neighbours_weight": self.neighbours.weight,
                "neighbours_centre": self.neighbours.centre, "neighbours_down_only": self.neighbours.down_only}
               if self.neighbours is not None else {}),
            **{k: v for k, v in self.meta.items()},
        }

    @property
    def detector_id(self) -> str:
        """Content hash of tensors and scoring settings: equal ids score identically. τ is not part of it:
        re-thresholding the same detector gives the same id, so its stored rows are replaced, not doubled."""
        h = hashlib.sha256()
        for a in (self.mean, self.components, self.singular_values):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        if self.coef is not None:
            h.update(b"coef" + np.ascontiguousarray(self.coef, dtype=np.float64).tobytes())
        ident = {
            "weighting": self.weighting,
            "orientation": self.orientation,
            **{k: self.meta.get(k) for k in ("model_fingerprint", "layer", "token", "max_tokens", "overlong")},
        }
        if self.form != "squared":
            ident["form"] = self.form
        if self.neighbours is not None:
            nb = self.neighbours
            for a in (nb.basis, nb.reference, nb.values):
                h.update(b"neighbours" + np.ascontiguousarray(a, dtype=np.float64).tobytes())
            ident["neighbours"] = {"k": nb.k, "weight": nb.weight}
            if nb.down_only or nb.centre:  # only then: a detector saved before these fields keeps its id
                ident["neighbours"].update(centre=nb.centre, down_only=nb.down_only)
        if self.link != "identity" or self.intercept:
            ident["link"], ident["intercept"] = self.link, float(self.intercept)
        h.update(json.dumps(ident, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``detector.safetensors`` and ``detector.json`` into ``directory`` atomically."""
        from safetensors.numpy import save_file

        from .. import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            **self.config(),
            "detector_id": self.detector_id,
            "saft_gx_version": __version__,
            "created_at": self.meta.get("created_at") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tensors = {"mean": self.mean, "components": self.components, "singular_values": self.singular_values}
        if self.coef is not None:
            tensors["coef"] = np.asarray(self.coef, dtype=np.float64)
        if self.neighbours is not None:
            tensors.update(neighbours_basis=self.neighbours.basis, neighbours_reference=self.neighbours.reference,
                           neighbours_values=self.neighbours.values)
        _atomic_write(d / "detector.safetensors", lambda p: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p)))
        _atomic_write(d / "detector.json", lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Detector":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        d = Path(directory)
        if d.is_file() and d.name in ("detector.json", "detector.safetensors"):
            d = d.parent
        meta_path, tensor_path = d / "detector.json", d / "detector.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise SaftError(f"--detector {directory}: expected detector.json and detector.safetensors in that folder")
        try:
            meta = json.loads(meta_path.read_text())
            t = load_file(str(tensor_path))
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise SaftError(f"--detector {directory}: unreadable ({str(e).splitlines()[0]})") from None
        meta = dict(meta)
        for key in ("k", "dim", "detector_id", "saft_gx_version"):
            meta.pop(key, None)
        weighting = meta.pop("weighting", "none")
        orientation = int(meta.pop("orientation", 1))
        threshold = meta.pop("threshold", None)
        form = meta.pop("form", "squared")
        intercept = float(meta.pop("intercept", 0.0))
        link = meta.pop("link", "identity")
        nb_k, nb_weight = meta.pop("neighbours_k", None), meta.pop("neighbours_weight", None)
        nb_centre, nb_down = float(meta.pop("neighbours_centre", 0.0)), bool(meta.pop("neighbours_down_only", False))
        neighbours = None
        if nb_k is not None:
            try:
                neighbours = Neighbours(t["neighbours_basis"].astype(np.float64),
                                        t["neighbours_reference"].astype(np.float64),
                                        t["neighbours_values"].astype(np.float64), int(nb_k), float(nb_weight),
                                        nb_centre, nb_down)
            except KeyError as e:
                raise SaftError(f"--detector {directory}: detector.json names neighbours but {e} is missing") from None
        det = cls(
            mean=t["mean"].astype(np.float64),
            components=t["components"].astype(np.float64),
            singular_values=t["singular_values"].astype(np.float64),
            weighting=weighting,
            orientation=orientation,
            threshold=None if threshold is None else float(threshold),
            meta=meta,
            form=form,
            coef=t["coef"].astype(np.float64) if "coef" in t else None,
            intercept=intercept,
            link=link,
            neighbours=neighbours,
        )
        return det


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


atomic_write = _atomic_write
__all__ = ["Detector", "MomentStats", "atomic_write", "asdict"]
