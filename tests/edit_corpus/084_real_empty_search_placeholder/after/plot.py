# plot.py: the model writes this script after the runs.
# Keep the figures in the session folder.
import json

import matplotlib.pyplot as plt

with open("run_0/final_info.json") as f:
    info = json.load(f)
plt.bar(["clean"], [info["summary"]["means"]["mcc_clean"]])
plt.savefig("mcc.png")
