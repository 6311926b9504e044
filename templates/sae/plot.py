"""Compare runs: reads run_*/final_info.json in the current folder and writes PNG figures beside them.

Usage: python plot.py   (no arguments)
"""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Figures: file name -> (title, [(summary metric, legend label), ...])
FIGURES = {
    "feature_recovery.png": ("Feature recovery (MCC, higher is better)",
                             [("mcc_clean", "clean"), ("mcc_contaminated", "contaminated")]),
    "explained_variance.png": ("Explained variance, SAEs trained on clean and on contaminated data "
                               "(held-out clean data; higher is better)",
                               [("ev_clean", "trained clean"), ("ev_contaminated", "trained contaminated")]),
    "sparsity.png": ("L0: active latents per sample (true L0 = planted features per sample)",
                     [("l0_clean", "clean"), ("l0_contaminated", "contaminated"), ("true_l0", "true")]),
    "lm.png": ("LM activations", [("ce_loss_recovered", "CE loss recovered"),
                                  ("explained_variance", "explained variance")]),
}


def load_runs(folder: Path = Path(".")) -> dict[str, dict]:
    """{"run_0": summary group, ...} in run order; runs without a readable final_info.json are skipped."""
    runs = {}
    paths = [p for p in folder.glob("run_*/final_info.json") if re.fullmatch(r"run_\d+", p.parent.name)]
    for path in sorted(paths, key=lambda p: int(p.parent.name.split("_")[1])):
        try:
            info = json.loads(path.read_text())
            runs[path.parent.name] = info["summary"]
        except (OSError, ValueError, KeyError):
            print(f"skipping {path}: not a readable final_info.json")
    return runs


def bar_chart(runs: dict[str, dict], title: str, series: list[tuple[str, str]], out: Path) -> bool:
    series = [(k, label) for k, label in series if any(k in r["means"] for r in runs.values())]
    if not series:
        return False
    names = list(runs)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.5))
    for j, (key, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        means = [runs[n]["means"].get(key, float("nan")) for n in names]
        errs = [runs[n].get("stderrs", {}).get(key, 0.0) for n in names]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    runs = load_runs()
    if not runs:
        print("no run_*/final_info.json found")
        return
    for filename, (title, series) in FIGURES.items():
        if bar_chart(runs, title, series, Path(filename)):
            print(f"wrote {filename}")


if __name__ == "__main__":
    main()
