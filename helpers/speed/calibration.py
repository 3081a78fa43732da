"""The speed model's calibration: the public decode measurements it learns from (``results/field/calibration.json``),
the least-squares fit of its constants on log time, leave-one-source-out validation, and the range that follows.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError
from helpers.core.paths import RESULTS_DIR
from helpers.memory.setup import LoadSetup
from helpers.specs.shapes import model_shape, shape_from_config
from helpers.speed.model import (
    CONSTANT_INFO,
    CONSTANTS,
    CONSTANTS_PATH,
    DecodeTerms,
    SpeedConstants,
    Stage,
    constants_from_dict,
    decode_terms,
)

FIELD_DIR = RESULTS_DIR / "field"
DATA_PATH = FIELD_DIR / "calibration.json"
#: percentiles of the out-of-source errors that make the printed range ("likely ..."): wide enough that every record
#: the course holds lies inside the range it prints for that configuration (the test suite checks it)
RANGE_PERCENTILES = (5, 95)
#: a constant no training point gives this share of its predicted time to is not identified: it takes its fallback
IDENTIFIED_SHARE = 0.03
#: what an unidentified constant falls back to: first principles for the attention costs, the desktop's host time for
#: a server, and the course's earlier assumption (10-50 us) for a GPU boundary
FALLBACK = {"flash_attn_cost": 1.0, "torch_attn_cost": 1.0, "dequant_cost": 1.0, "layer_s_server": "layer_s_desktop",
            "hop_s": 30e-6, "torch_host_extra": 0.0}
START = {"bandwidth_fraction": 0.8, "flash_attn_cost": 1.0, "torch_attn_cost": 1.0, "dequant_cost": 1.0,
         "layer_s_desktop": 30e-6, "layer_s_server": 100e-6, "torch_host_extra": 0.3, "hop_s": 30e-6}
#: which constant each term of ``DecodeTerms.features`` depends on, beyond the bandwidth fraction
_TERM_CONSTANT = {"weights": "bandwidth_fraction", "attention_flash": "flash_attn_cost",
                  "attention_torch": "torch_attn_cost", "dequant": "dequant_cost", "layers_desktop": "layer_s_desktop",
                  "layers_server": "layer_s_server", "layers_desktop_torch": "torch_host_extra",
                  "layers_server_torch": "torch_host_extra", "hops": "hop_s"}


@dataclass(frozen=True)
class Point:
    """One public measurement: where it comes from, its configuration, the measured tok/s and the model's terms."""

    id: str
    source: str
    tok_s: float
    terms: DecodeTerms
    config: dict
    path: str

    @property
    def setup(self) -> tuple:
        """What stays the same along a depth sweep."""
        c = self.config
        return (self.source, c["model"], c["bpw"], tuple(c["gpus"]), c["cache"], c["flash_attn"])


# --------------------------------------------------------------------------------------------------- the data
def data_sha256(path: Path = DATA_PATH) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def point_setup(cfg: dict, models: dict | None = None) -> LoadSetup:
    """A calibration point's configuration as a ``LoadSetup``: its model (a config in the set's ``models``, or a
    bundled one), bpw, head bits, cache mode, flash-attn, GPUs and host."""
    own = (models or {}).get(cfg["model"])
    shape = shape_from_config(own, cfg["model"], own.get("_source", "")) if own else model_shape(cfg["model"])
    return LoadSetup(shape, bpw=float(cfg["bpw"]), head_bits=int(cfg.get("head_bits", 6)), cache_mode=cfg["cache"],
                     flash_attn=bool(cfg["flash_attn"]), gpus=tuple(cfg["gpus"]), host=cfg.get("host"))


def point_terms(cfg: dict, models: dict | None = None) -> DecodeTerms:
    """The speed model's terms for a calibration point: its setup at its depth, the layers split over its GPUs in
    proportion to their memory."""
    setup = point_setup(cfg, models)
    shape, w, gpus = setup.shape, setup.weights, setup.gpus
    if setup.host is None and len(gpus) > 1:  # several cards: a server only if every one usually is
        setup = setup.with_(host="server" if all(g.get("host") == "server" for g in gpus) else "desktop")
    mem = [float(g["vram_gib"]) for g in gpus]
    layers = [math.floor(shape.n_layers * m / sum(mem)) for m in mem]
    for i in range(shape.n_layers - sum(layers)):
        layers[i % len(layers)] += 1
    body = w.vram - w.head
    stages = [Stage(n, body * n / shape.n_layers + (w.head if i == len(gpus) - 1 else 0), float(g["bandwidth_gbs"]))
              for i, (n, g) in enumerate(zip(layers, gpus)) if n]
    return decode_terms(setup, stages, int(cfg["depth"]))


def load_points(path: Path = DATA_PATH, *, used_only: bool = True) -> tuple[dict, list[Point]]:
    """The calibration set and its points (those marked ``use: false`` left out unless ``used_only`` is False)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CourseError(f"cannot read the calibration set {path} ({type(exc).__name__}): it ships with the course "
                          "in results/field/") from None
    out = []
    for p in doc["points"]:
        if used_only and not p.get("use", True):
            continue
        if p["source"] not in doc["sources"]:
            raise CourseError(f"calibration point {p['id']} names an unknown source {p['source']!r}")
        try:
            terms = point_terms(p["config"], doc.get("models"))
        except (CourseError, KeyError) as exc:
            raise CourseError(f"calibration point {p['id']}: {exc}") from None
        out.append(Point(p["id"], p["source"], float(p["measured"]["decode_tok_s"]), terms, p["config"],
                         "flash" if p["config"]["flash_attn"] else "torch"))
    return doc, out


# ---------------------------------------------------------------------------------------------------- the fit
def _matrix(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = list(_TERM_CONSTANT)
    X = np.array([[p.terms.features()[k] for k in keys] for p in points], dtype=float)
    pcie = np.array([p.terms.pcie_s for p in points], dtype=float)
    y = np.log(np.array([1.0 / p.tok_s for p in points]))
    return X, pcie, y


def _coefficients(v: dict) -> np.ndarray:
    """The multipliers of ``_TERM_CONSTANT``'s terms, in its order (``SpeedConstants.coefficients``)."""
    c = SpeedConstants(dict(v), 1.0, 1.0, "").coefficients()
    return np.array([c[k] for k in _TERM_CONSTANT])


def identified(points: Sequence[Point], values: dict | None = None) -> dict[str, bool]:
    """Which constants the points pin down: some point's predicted time has at least ``IDENTIFIED_SHARE`` in a term
    that depends on it."""
    X, pcie, _ = _matrix(points)
    parts = X * _coefficients(values or START)
    share = parts / (parts.sum(axis=1, keepdims=True) + pcie[:, None])
    out = {name: False for name in CONSTANT_INFO}
    for j, k in enumerate(_TERM_CONSTANT):
        if share[:, j].max(initial=0.0) >= IDENTIFIED_SHARE:
            out[_TERM_CONSTANT[k]] = True
    out["bandwidth_fraction"] = True
    return out


def _expand(theta: np.ndarray, free: list[str], fixed: dict) -> dict:
    v = dict(zip(free, np.exp(theta)))
    for name, f in fixed.items():
        v[name] = f
    for name, f in fixed.items():
        if isinstance(f, str):
            v[name] = v[f]
    return v


def fit(points: Sequence[Point], *, weights: str = "per_source", iterations: int = 200) -> dict:
    """Least squares on log time: minimise sum w (log t_measured - log t_model)^2 over the constants (positive: fitted
    as logs, Levenberg-Marquardt). ``weights='per_source'``: every source counts once, however many points it has.
    Constants the points do not pin down take ``FALLBACK``. Returns {name: value}."""
    if not points:
        raise CourseError("no calibration points to fit")
    ident = identified(points)
    fixed = {n: FALLBACK[n] for n, ok in ident.items() if not ok}
    free = [n for n in CONSTANT_INFO if n not in fixed]
    X, pcie, y = _matrix(points)
    count: dict[str, int] = {}
    for p in points:
        count[p.source] = count.get(p.source, 0) + 1
    w = np.array([1.0 / count[p.source] if weights == "per_source" else 1.0 for p in points])
    sw = np.sqrt(w / w.sum())

    def resid(th):
        t = X @ _coefficients(_expand(th, free, fixed)) + pcie
        return sw * (y - np.log(t))

    theta = np.log([START[n] for n in free])
    lam, r = 1e-3, resid(theta)
    cost = float(r @ r)
    for _ in range(iterations):
        J = np.empty((len(r), len(theta)))
        for j in range(len(theta)):
            d = np.zeros_like(theta)
            d[j] = 1e-6
            J[:, j] = (resid(theta + d) - r) / 1e-6
        A, g = J.T @ J, J.T @ r
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
        new = np.clip(theta + np.clip(step, -2.0, 2.0), -30.0, 5.0)
        rn = resid(new)
        cn = float(rn @ rn)
        if cn < cost:
            theta, r, lam = new, rn, lam / 3
            if cost - cn < 1e-15:
                cost = cn
                break
            cost = cn
        else:
            lam *= 5
            if lam > 1e12:
                break
    v = _expand(theta, free, fixed)
    return {n: float(v[n]) for n in CONSTANT_INFO}


def predict(points: Sequence[Point], values: dict) -> np.ndarray:
    """Predicted tok/s of each point with these constants."""
    X, pcie, _ = _matrix(points)
    return 1.0 / (X @ _coefficients(values) + pcie)


# ------------------------------------------------------------------------------------------------- validation
def leave_one_source_out(points: Sequence[Point]) -> list[dict]:
    """Fit without each source in turn, predict that source's points. One row per point: id, source, path, measured,
    predicted (out of source), ratio measured/predicted, and the fold's constants."""
    rows = []
    for src in sorted({p.source for p in points}):
        train = [p for p in points if p.source != src]
        test = [p for p in points if p.source == src]
        vals = fit(train)
        for p, pred in zip(test, predict(test, vals)):
            rows.append({"id": p.id, "source": src, "path": p.path, "host": p.terms.host, "gpus": len(p.config["gpus"]),
                         "cache": p.config["cache"], "depth": p.config["depth"], "measured_tok_s": p.tok_s,
                         "predicted_tok_s": float(pred), "ratio": p.tok_s / float(pred), "setup": p.setup,
                         "fold": vals})
    return rows


def calibration_rows(path: Path = DATA_PATH, constants: SpeedConstants | None = None) -> list[dict]:
    """Every used point with its prediction from the shipped constants (``predicted_tok_s``) and from a fit that left
    its source out (``predicted_out_tok_s``, ``ratio_out``): what the notebooks plot and tabulate."""
    c = constants or CONSTANTS
    _, points = load_points(path)
    out = {r["id"]: r for r in leave_one_source_out(points)}
    rows = []
    for p, pred in zip(points, predict(points, c.values)):
        o = out[p.id]
        rows.append({"id": p.id, "source": p.source, "path": p.path, "host": p.terms.host, "gpus": p.config["gpus"],
                     "model": p.config["model"], "depth": p.config["depth"], "cache": p.config["cache"],
                     "measured_tok_s": p.tok_s, "predicted_tok_s": float(pred), "ratio": p.tok_s / float(pred),
                     "predicted_out_tok_s": o["predicted_tok_s"], "ratio_out": o["ratio"]})
    return rows


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def summarise(rows: Sequence[dict], low: float, high: float) -> dict:
    """Median measured/predicted, share within +-15% and +-25%, share inside [low, high] x predicted."""
    r = [x["ratio"] for x in rows]
    if not r:
        return {"n": 0}
    return {"n": len(r), "median_ratio": statistics.median(r),
            "within_15pct": sum(abs(x - 1) <= 0.15 for x in r) / len(r),
            "within_25pct": sum(abs(x - 1) <= 0.25 for x in r) / len(r),
            "inside_range": sum(low <= x <= high for x in r) / len(r)}


def depth_slopes(rows: Sequence[dict]) -> list[dict]:
    """For each setup measured at two depths or more: the measured slope of seconds per token against depth (the
    shallowest and the deepest point) and the out-of-source predicted one, and their ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setup"], []).append(r)
    out = []
    for setup, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["depth"])
        a, b = rs[0], rs[-1]
        if b["depth"] - a["depth"] < 1000:
            continue
        dd = b["depth"] - a["depth"]
        meas = (1 / b["measured_tok_s"] - 1 / a["measured_tok_s"]) / dd
        pred = (1 / b["predicted_tok_s"] - 1 / a["predicted_tok_s"]) / dd
        out.append({"setup": setup, "source": a["source"], "path": a["path"], "from_depth": a["depth"],
                    "to_depth": b["depth"], "measured_us_per_position": meas * 1e6,
                    "predicted_us_per_position": pred * 1e6, "ratio": meas / pred if pred > 0 else math.inf})
    return out


# ------------------------------------------------------------------------------------------------ constants file
def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def calibrate(path: Path = DATA_PATH) -> dict:
    """Fit on every used point, validate leaving each source out, and return the constants document (what
    ``constants.json`` holds): the constants, the range from the out-of-source errors, and the validation."""
    doc, points = load_points(path)
    values = fit(points)
    ident = identified(points, values)
    rows = leave_one_source_out(points)
    q_lo, q_hi = RANGE_PERCENTILES
    low, high = percentile([r["ratio"] for r in rows], q_lo), percentile([r["ratio"] for r in rows], q_hi)
    overall = summarise(rows, low, high)
    slopes = depth_slopes(rows)
    per_source = {s: summarise([r for r in rows if r["source"] == s], low, high) for s in sorted(doc["sources"])
                  if any(r["source"] == s for r in rows)}
    per_path = {k: summarise([r for r in rows if r["path"] == k], low, high) for k in ("flash", "torch")}
    constants = {n: {"value": _sig(values[n]), "symbol": CONSTANT_INFO[n][0], "meaning": CONSTANT_INFO[n][3],
                     "identified": bool(ident[n]),
                     **({} if ident[n] else {"fallback": _fallback_text(n)})}
                 for n in CONSTANT_INFO}
    return {
        "what": "the speed model's constants (helpers/speed/model.py), fitted by `python -m helpers calibrate` on "
                "results/field/calibration.json: least squares on log time, every source weighted once",
        "data": "results/field/calibration.json", "data_sha256": data_sha256(path),
        "n_points": len(points), "n_sources": len({p.source for p in points}),
        "constants": constants,
        "range": {"low": _sig(low), "high": _sig(high),
                  "from": f"the {q_lo}th-{q_hi}th percentile of measured/predicted over {len(rows)} points, each "
                          f"predicted by a fit that left its own source out ({len(per_source)} sources)"},
        "validation": {"leave_one_source_out": _round(overall),
                       "per_source": {k: _round(v) for k, v in per_source.items()},
                       "per_path": {k: _round(v) for k, v in per_path.items()},
                       "depth_slopes": [{"source": s["source"], "path": s["path"], "from_depth": s["from_depth"],
                                         "to_depth": s["to_depth"], "ratio": _sig(s["ratio"])} for s in slopes]},
    }


def _fallback_text(name: str) -> str:
    f = FALLBACK[name]
    what = (f"the value of {f}" if isinstance(f, str) else "first principles (1)" if f == 1.0 else
            "none (0)" if f == 0 else f"{f * 1e6:g} us, the course's earlier assumption")
    return f"no calibration point pins it down: {what}"


def _round(d: dict) -> dict:
    return {k: (_sig(v) if isinstance(v, float) else v) for k, v in d.items()}


def write_constants(doc: dict, path: Path = CONSTANTS_PATH) -> None:
    atomic_write_text(Path(path), json.dumps(doc, indent=1) + "\n")


def constants_of(doc: dict) -> SpeedConstants:
    return constants_from_dict(doc)


__all__ = ["calibration_rows", "DATA_PATH", "FIELD_DIR", "Point", "point_terms", "load_points", "fit", "predict",
           "identified",
           "leave_one_source_out", "summarise", "depth_slopes", "calibrate", "write_constants", "data_sha256",
           "percentile", "constants_of"]
