"""Learning-rate x sparsity sweep of the SAE template's baseline on one preset: what each setting recovers.

Usage: PYTHONPATH=. python bench/sae_sweep.py [--preset cpu|gpu] [--condition clean] [--steps N] [--batch N]
                                              [--lr 1e-3,3e-3] [--l1 1.2,2.0] [--budget-s 240]

Trains the template's own train_sae() once per (lr, l1_coeff) pair, on seed 0 and one data condition, scores it
with sae_eval.evaluate() on the held-out clean data, and prints a table: MCC, explained variance, L0 against the
true L0, dead latents, shrinkage and seconds. Settings not started before --budget-s ran out are listed as
skipped. The device is CUDA when present (SAE_DEVICE overrides), else the CPU; the preset is the one the template
would choose there (gpu on CUDA, else cpu). Other defaults are the preset's own steps, batch, lr and l1_coeff.
Written for tuning the gpu preset on a machine with a GPU, in one short call.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "sae"
sys.path.insert(0, str(TEMPLATE))

import experiment  # noqa: E402  (the template's experiment.py)
import sae_data  # noqa: E402
import sae_eval  # noqa: E402


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 1e-3,3e-3") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(sae_data.SYNTHETIC_PRESETS), default=None,
                        help="synthetic preset (default: gpu on CUDA, else cpu, as the template chooses)")
    parser.add_argument("--condition", choices=sae_data.SyntheticSource.conditions, default="clean")
    parser.add_argument("--steps", type=int, default=0, help="training steps per setting (default: the preset's)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the preset's)")
    parser.add_argument("--lr", type=floats, default=None, help="learning rates, comma-separated")
    parser.add_argument("--l1", type=floats, default=None, help="l1_coeff values, comma-separated")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new setting after this many seconds")
    args = parser.parse_args()

    device = os.environ.get("SAE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    args.preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    base = experiment.HPARAMS[args.preset]
    steps, batch = args.steps or base["steps"], args.batch or base["batch_size"]
    grid = [(lr, l1) for lr in (args.lr or [base["lr"]]) for l1 in (args.l1 or [base["l1_coeff"]])]
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS[args.preset], device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"

    table = Table(title=f"SAE baseline sweep: {args.preset} preset, {args.condition} data, {steps} steps x batch "
                        f"{batch}, d_sae {base['d_sae']}, on {name} (true L0 {source.true_l0:.1f})")
    for col in ("lr", "l1_coeff", "mcc", "mmcs", "EV", "L0", "dead", "shrinkage", "train s", "samples/s"):
        table.add_column(col, justify="right")
    start = time.time()
    for lr, l1 in grid:
        if time.time() - start > args.budget_s:
            table.add_row(f"{lr:g}", f"{l1:g}", "skipped: --budget-s spent", *[""] * 7)
            continue
        hp = dict(base, lr=lr, l1_coeff=l1, batch_size=batch)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                sae, stats = experiment.train_sae(source, args.condition, 0, hp, steps, device)
                m = sae_eval.evaluate(sae, source, args.condition, stats)
        except sae_eval.SAEGuardError as exc:
            table.add_row(f"{lr:g}", f"{l1:g}", f"failed: {exc}", *[""] * 7)
            continue
        table.add_row(f"{lr:g}", f"{l1:g}", f"{m['mcc']:.3f}", f"{m['mmcs']:.3f}", f"{m['explained_variance']:.3f}",
                      f"{m['l0']:.1f}", f"{m['dead_frac']:.3f}", f"{m['shrinkage']:.3f}",
                      f"{stats['train_seconds']:.1f}", f"{stats['samples'] / stats['train_seconds']:,.0f}")
        print(f"  lr {lr:g} l1 {l1:g}: mcc {m['mcc']:.3f} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
