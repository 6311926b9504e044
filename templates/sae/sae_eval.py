"""Evaluation of a trained SAE (protected: this is the yardstick, so it is not editable).

evaluate() scores one trained SAE on held-out data; write_final_info() aggregates over seeds and writes
final_info.json as {"group": {"means": {...}, "stderrs": {...}}}. Guards: an SAE that trained for zero steps, whose
latents are all dead, or whose loss/weights are NaN raises SAEGuardError, printed as one line on stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import sae_data
import torch
from scipy.optimize import linear_sum_assignment

HUNGARIAN_MAX_CELLS = 16_384 * 16_384  # larger similarity matrices use greedy matching


class SAEGuardError(RuntimeError):
    """The run did not produce a usable SAE (no training, all latents dead, NaN)."""


def _one_line_errors(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, SAEGuardError | sae_data.SAEDataError):
        print(f"error: {exc}", file=sys.stderr)  # uncaught -> exit status 1
    else:
        _default(exc_type, exc, tb)


sys.excepthook = _one_line_errors


# ------------------------------------------------------------------------------------------------ guards
def check_loss(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise SAEGuardError(f"training loss is {value} at step {step}: the run diverged (lower lr or fix the loss)")


def check_trained(stats: dict) -> None:
    if int(stats.get("steps", 0)) < 1:
        raise SAEGuardError("the SAE trained for 0 steps: nothing was learned, so there is nothing to evaluate")
    if not math.isfinite(float(stats.get("final_loss", float("nan")))):
        raise SAEGuardError(f"final training loss is {stats.get('final_loss')}: the run diverged")


# ----------------------------------------------------------------------------------------------- metrics
def match_features(W_dec: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    """(MCC, MMCS) between learned decoder rows [d_sae, d] and ground-truth features [n, d].

    MCC: mean |cos| over a one-to-one (Hungarian) matching of latents to features, over min(d_sae, n) pairs.
    MMCS: mean over ground-truth features of the best |cos| with any latent.
    """
    dec = W_dec.detach().float()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gt = gt.float().to(dec.device)
    cos = (dec @ gt.T).abs()  # [d_sae, n]
    mmcs = float(cos.max(dim=0).values.mean())
    if cos.numel() <= HUNGARIAN_MAX_CELLS:
        c = cos.cpu().double().numpy()
        rows, cols = linear_sum_assignment(c, maximize=True)
        return float(c[rows, cols].mean()), mmcs
    # greedy one-to-one matching (best pairs first), for very large matrices
    k = min(cos.shape)
    c = cos.cpu().numpy()
    order = np.argsort(-c, axis=None)
    used_r, used_c = np.zeros(c.shape[0], bool), np.zeros(c.shape[1], bool)
    total, got = 0.0, 0
    for i in order:
        r, j = divmod(int(i), c.shape[1])
        if not (used_r[r] or used_c[j]):
            used_r[r] = used_c[j] = True
            total += float(c[r, j])
            got += 1
            if got == k:
                break
    return total / k, mmcs


class _Sums:
    """Streaming reconstruction/sparsity statistics over evaluation chunks."""

    def __init__(self, d_sae: int, device) -> None:
        self.n = 0
        self.sq_err = self.sum_x = self.sum_x2 = self.l0 = self.norm_x = self.norm_xh = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.d = 0

    def add(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        if not torch.isfinite(x_hat).all():
            raise SAEGuardError("the SAE reconstruction contains NaN/inf")
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        self.n += len(x)
        self.d = x.shape[1]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_x = self.sum_x + x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.l0 += float((f > 0).sum())
        self.norm_x += float(x.norm(dim=1).sum())
        self.norm_xh += float(x_hat.norm(dim=1).sum())
        self.fired |= (f > 0).any(0)

    def result(self) -> dict[str, float]:
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n  # sum over dims of n * Var(x_d)
        return {
            "explained_variance": 1.0 - self.sq_err / total_var,
            "mse": self.sq_err / (self.n * self.d),
            "l0": self.l0 / self.n,
            "dead_frac": 1.0 - float(self.fired.float().mean()),
            "shrinkage": 1.0 - self.norm_xh / self.norm_x,
        }


def score_reconstruction(x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    s = _Sums(f.shape[1], f.device)
    s.add(x, f, x_hat)
    return s.result()


def score_synthetic(W_dec, gt_features, x, f, x_hat, true_codes) -> dict[str, float]:
    """All synthetic metrics from a decoder, a batch, its latents/reconstruction and the true codes."""
    out = score_reconstruction(x, f, x_hat)
    out["mcc"], out["mmcs"] = match_features(W_dec, gt_features)
    out["true_l0"] = float((true_codes > 0).sum()) / len(true_codes)
    return out


@torch.no_grad()
def _encode_decode(sae, x: torch.Tensor, chunk: int = 4096):
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        f = sae.encode(xb)
        yield xb, f, sae.decode(f)


@torch.no_grad()
def evaluate(sae, source, condition: str, train_stats: dict) -> dict[str, float]:
    """Score one trained SAE; every metric is computed on the source's held-out clean data."""
    check_trained(train_stats)
    W_dec = sae.W_dec.detach()
    if not torch.isfinite(W_dec).all():
        raise SAEGuardError("the SAE decoder weights contain NaN/inf")
    batch = source.eval_batch()
    sums = _Sums(W_dec.shape[0], W_dec.device)
    for xb, f, xh in _encode_decode(sae, batch.x):
        sums.add(xb, f, xh)
    out = sums.result()
    if out["dead_frac"] >= 1.0:
        raise SAEGuardError("all SAE latents are dead on the evaluation data (sparsity penalty too strong?)")
    if source.kind == "synthetic":
        out["mcc"], out["mmcs"] = match_features(W_dec, source.features)
        out["true_l0"] = float((batch.codes > 0).sum()) / len(batch.codes)
    else:
        out.update(ce_loss_recovered(sae, source))
    out.update({k: float(train_stats[k]) for k in ("steps", "samples", "train_seconds") if k in train_stats})
    return out


# ---------------------------------------------------------------------------------- LM: CE-loss splice
@torch.no_grad()
def ce_loss_recovered(sae, source) -> dict[str, float]:
    """Splice the SAE reconstruction into the LM's residual stream and compare next-token CE losses.

    ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1.0 means the reconstruction is as good as
    the real activations, 0.0 as bad as zeroing the residual stream at that layer.
    """
    model, _ = source.model_and_tokenizer()
    ids = source.eval_ids[: source.spec.ce_sequences].to(source.device)
    block = source.blocks()[source.spec.layer]
    mode = {"now": "clean"}

    def hook(_module, _inp, output):
        hs = output[0] if isinstance(output, tuple) else output
        if mode["now"] == "clean":
            return output
        new = hs.clone()
        if mode["now"] == "zero":
            new[:, 1:] = 0.0
        else:
            acts = hs[:, 1:].float() * source.scale
            new[:, 1:] = (sae.decode(sae.encode(acts.reshape(-1, acts.shape[-1]))) / source.scale).reshape(
                acts.shape
            ).to(hs.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        ce = {}
        for m in ("clean", "sae", "zero"):
            mode["now"] = m
            logits = model(ids).logits[:, 1:-1].float()
            ce[m] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)))
    finally:
        handle.remove()
    rec = (ce["zero"] - ce["sae"]) / max(ce["zero"] - ce["clean"], 1e-9)
    return {"ce_loss_recovered": rec, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"]}


# --------------------------------------------------------------------------------------- final_info.json
SUMMARY_SYNTHETIC = {  # summary name -> (condition, metric)
    "mcc_clean": ("clean", "mcc"),
    "mcc_contaminated": ("contaminated", "mcc"),
    "ev_clean": ("clean", "explained_variance"),
    "ev_contaminated": ("contaminated", "explained_variance"),
    "l0_clean": ("clean", "l0"),
    "l0_contaminated": ("contaminated", "l0"),
    "true_l0": ("clean", "true_l0"),
    "dead_frac_contaminated": ("contaminated", "dead_frac"),
}
SUMMARY_LM = {k: ("lm", k) for k in ("ce_loss_recovered", "explained_variance", "l0", "dead_frac")}


def _mean_sem(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    sem = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), sem


def summarize(results: dict[str, list[dict[str, float]]]) -> dict:
    """{condition: [metrics per seed]} -> {"group": {"means": ..., "stderrs": ...}} with a "summary" group."""
    info: dict = {}
    for cond, per_seed in results.items():
        keys = per_seed[0].keys()
        stats = {k: _mean_sem([r[k] for r in per_seed]) for k in keys}
        info[cond] = {"means": {k: v[0] for k, v in stats.items()}, "stderrs": {k: v[1] for k, v in stats.items()}}
    table = SUMMARY_SYNTHETIC if "contaminated" in results else SUMMARY_LM
    n = min(len(v) for v in results.values())
    per_seed_summary = []
    for i in range(n):
        row = {name: results[c][i][m] for name, (c, m) in table.items() if c in results}
        if "contaminated" in results:
            row["mcc_drop"] = row["mcc_clean"] - row["mcc_contaminated"]
        row["train_seconds"] = sum(results[c][i].get("train_seconds", 0.0) for c in results)
        per_seed_summary.append(row)
    stats = {k: _mean_sem([r[k] for r in per_seed_summary]) for k in per_seed_summary[0]}
    info["summary"] = {"means": {k: v[0] for k, v in stats.items()}, "stderrs": {k: v[1] for k, v in stats.items()}}
    return info


def atomic_write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_final_info(out_dir: str | Path, results: dict[str, list[dict[str, float]]], run_info: dict) -> dict:
    """Write final_info.json (metrics) and run_info.json (settings, data fingerprint); return the metrics."""
    info = summarize(results)
    atomic_write_json(Path(out_dir) / "final_info.json", info)
    atomic_write_json(Path(out_dir) / "run_info.json", run_info)
    return info
