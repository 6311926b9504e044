import json
import os

import matplotlib.pyplot as plt
import numpy as np

# Which runs to plot, and their labels in the legend.
labels = {
    "run_0": "Baseline",
}


def load(run):
    with open(os.path.join(run, "final_info.json")) as f:
        return json.load(f)


runs = [r for r in labels if os.path.exists(os.path.join(r, "final_info.json"))]
infos = {r: load(r) for r in runs}

# Plot 1: MCC on clean data
fig, ax = plt.subplots(figsize=(6, 4))
values = [infos[r]["summary"]["means"]["mcc_clean"] for r in runs]
ax.bar([labels[r] for r in runs], values)
ax.set_ylabel("MCC")
fig.tight_layout()
fig.savefig("mcc_clean.png")

# Plot 2: MCC on contaminated data
fig, ax = plt.subplots(figsize=(6, 4))
values = [infos[r]["summary"]["means"]["mcc_contaminated"] for r in runs]
ax.bar([labels[r] for r in runs], values)
ax.set_ylabel("MCC")
fig.tight_layout()
fig.savefig("mcc_contaminated.png")
