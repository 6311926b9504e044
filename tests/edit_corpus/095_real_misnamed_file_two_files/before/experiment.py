"""Sparse autoencoder (SAE) experiment: the file to edit.

An SAE learns an overcomplete dictionary W_dec (one unit-norm row per latent) such that each activation x is
reconstructed from a few active latents: x ~ ReLU((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec.

Data and metrics live in sae_data.py and sae_eval.py (protected, read-only). By default the activations are
synthetic with planted ground-truth features, in two conditions: "clean", and "contaminated" with 1% heavy-tailed
outliers. Both are scored on clean held-out data, so a method that ignores outliers keeps mcc_contaminated close to
mcc_clean. Run: python experiment.py --out_dir=run_i  (no other arguments; knobs are the constants below).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import sae_data
import sae_eval

# Training hyperparameters per data preset: "cpu" (64-dim synthetic, the default), "gpu" (768-dim synthetic,
# 16k planted features; chosen on CUDA) and "lm" (real LM activations, when SAE_MODEL_PATH is set).
# SAE_FAST=1 uses fast_steps instead of steps.
HPARAMS = {
    "cpu": dict(d_sae=256, lr=5e-3, batch_size=1024, steps=3000, fast_steps=1000, l1_coeff=0.5),
    "gpu": dict(d_sae=4096, lr=1e-3, batch_size=4096, steps=25_000, fast_steps=2000, l1_coeff=0.5),
    "lm": dict(d_sae=1152, lr=2e-3, batch_size=1024, steps=1000, fast_steps=150, l1_coeff=1.0),
}
LOG_EVERY = 250  # steps between loss checks/prints


class CustomSAE(nn.Module):
    """ReLU SAE. W_enc [d_in, d_sae], W_dec [d_sae, d_in] with unit-norm rows, b_enc [d_sae], b_dec [d_in]."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        W_dec = torch.randn(d_sae, d_in)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # encoder starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Keep every decoder row (one latent's direction) at unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


class CustomTrainer:
    """Adam on reconstruction + L1 sparsity; decoder rows are renormalised after every step."""

    def __init__(self, sae: CustomSAE, lr: float, l1_coeff: float):
        self.sae = sae
        self.l1_coeff = l1_coeff
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=lr)

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x_hat, f = self.sae(x, output_features=True)
        # reconstruction: squared error per sample, averaged over the batch
        recon = (x - x_hat).pow(2).sum(dim=-1).mean()
        # sparsity: L1 of latent activations weighted by decoder row norms (1 here, kept for generality)
        sparsity = (f * self.sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
        loss = recon + self.l1_coeff * sparsity
        return {"loss": loss, "recon": recon, "sparsity": sparsity}

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.loss(x)
        losses["loss"].backward()
        self.optimizer.step()
        self.sae.normalize_decoder()
        return losses


def train_sae(source, condition: str, seed: int, hp: dict, steps: int, device: str):
    """Train one SAE on one data condition; returns (sae, stats)."""
    torch.manual_seed(seed)
    sae = CustomSAE(source.d_in, hp["d_sae"]).to(device)
    trainer = CustomTrainer(sae, lr=hp["lr"], l1_coeff=hp["l1_coeff"])
    batches = source.batches(condition, seed, hp["batch_size"])
    use_bf16 = device.startswith("cuda")  # bf16 autocast on GPU; fp32 on CPU
    start, last = time.time(), float("nan")
    for step in range(steps):
        x = next(batches)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            losses = trainer.update(step, x)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            last = losses["loss"].item()
            sae_eval.check_loss(last, step + 1)  # stops the run on NaN/inf
            print(f"[{condition} seed {seed}] step {step + 1}/{steps} loss {last:.4f}", flush=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    stats = {"steps": steps, "samples": steps * hp["batch_size"], "train_seconds": time.time() - start,
             "final_loss": last}
    return sae, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, default="run_0")
    out_dir = Path(parser.parse_args().out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    settings = sae_data.settings_from_env()
    if settings.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    source = sae_data.load_source(settings)
    hp = HPARAMS[source.preset]
    steps = hp["fast_steps"] if settings.fast else hp["steps"]

    results: dict[str, list[dict]] = {c: [] for c in source.conditions}
    for seed in settings.seeds:
        for condition in source.conditions:
            sae, stats = train_sae(source, condition, seed, hp, steps, settings.device)
            results[condition].append(sae_eval.evaluate(sae, source, condition, stats))

    run_info = {"settings": settings.__dict__, "data": source.fingerprint(), "hparams": hp, "steps": steps}
    info = sae_eval.write_final_info(out_dir, results, run_info)
    print(json.dumps(info["summary"]["means"], indent=2))


if __name__ == "__main__":
    main()
