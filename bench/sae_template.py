"""Training throughput of the SAE template (templates/sae): samples per second, data generation included.

Usage: PYTHONPATH=. .venv/bin/python bench/sae_template.py [--steps N]

Runs the template's own train_sae() for each preset on the CPU and, where CUDA is present, on the GPU, and prints
a table. Reference: SynthSAEBench-16k (768 dims, 16k features, width 4096) trains at about 200k samples/s on one
H100 (200M samples in 15-20 minutes).

The table also counts the floating-point work of one step (torch's FlopCounterMode, on the CPU): the data
generation (a dense [batch, n_features] code matrix times the feature matrix, fp32/TF32 on CUDA) and the SAE
update (forward and backward, bf16 autocast on CUDA). "H100 FLOP ceiling" (gpu preset only) is the samples/s an
H100 SXM would reach if each part ran at its dense peak (989 TFLOP/s bf16, 494 TFLOP/s TF32). Real kernels reach
a fraction of it, and the dense data generation also moves about 3.3 GB per step at the gpu preset (about 1 ms at
the H100's 3.35 TB/s), which bounds it further.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
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

H100_REFERENCE = 200_000  # samples/s, SynthSAEBench-16k on one H100
H100_PEAK_BF16, H100_PEAK_TF32 = 989e12, 494e12  # dense FLOP/s, H100 SXM data sheet


@functools.cache
def flops_per_step(preset: str) -> tuple[float, float]:
    """(data generation, SAE update) FLOPs of one training step of `preset`, counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS[preset], "cpu")
    hp = experiment.HPARAMS[preset]
    with FlopCounterMode(display=False) as counter:
        x = source.sample(hp["batch_size"], torch.Generator().manual_seed(0), contaminated=True).x
    data = counter.get_total_flops()
    trainer = experiment.CustomTrainer(experiment.CustomSAE(source.d_in, hp["d_sae"]), hp["lr"], hp["l1_coeff"])
    with FlopCounterMode(display=False) as counter:
        trainer.update(0, x)
    return float(data), float(counter.get_total_flops())


def measure(device: str, preset: str, steps: int) -> tuple[float, float]:
    """(samples/s, seconds per step) of train_sae on `device` for the synthetic `preset`, after a warm-up."""
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS[preset], device)
    hp = experiment.HPARAMS[preset]
    with contextlib.redirect_stdout(io.StringIO()):
        experiment.train_sae(source, "contaminated", 0, hp, max(2, steps // 10), device)  # warm-up
        _, stats = experiment.train_sae(source, "contaminated", 0, hp, steps, device)
    return stats["samples"] / stats["train_seconds"], stats["train_seconds"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="timed steps per case (default: per device/preset)")
    args = parser.parse_args()
    cases = [("cpu", "cpu", 500), ("cpu", "gpu", 3)]
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        cases += [("cuda", "cpu", 2000), ("cuda", "gpu", 300)]
    table = Table(title=f"SAE template training throughput (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    columns = ("device", "preset", "d_in x d_sae", "batch", "steps", "ms/step", "samples/s", "vs H100 ref",
               "GFLOP/step data+SAE", "H100 FLOP ceiling")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("device", "preset") else "left")
    for device, preset, default_steps in cases:
        steps = args.steps or default_steps
        spec, hp = sae_data.SYNTHETIC_PRESETS[preset], experiment.HPARAMS[preset]
        t0 = time.time()
        rate, per_step = measure(device, preset, steps)
        data_flops, sae_flops = flops_per_step(preset)
        ceiling = hp["batch_size"] / (data_flops / H100_PEAK_TF32 + sae_flops / H100_PEAK_BF16)
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        table.add_row(name, preset, f"{spec.d_in} x {hp['d_sae']}", str(hp["batch_size"]), str(steps),
                      f"{per_step * 1e3:.1f}", f"{rate:,.0f}", f"{rate / H100_REFERENCE:.2f}x" if preset == "gpu" else "-",
                      f"{data_flops / 1e9:.1f}+{sae_flops / 1e9:.1f}",
                      f"{ceiling / 1e6:,.1f}M samples/s" if preset == "gpu" else "-")
        print(f"  {device}/{preset}: {time.time() - t0:.1f} s", file=sys.stderr)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
