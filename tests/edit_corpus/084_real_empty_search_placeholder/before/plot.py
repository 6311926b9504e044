# plot.py: the model writes this script after the runs.
# Keep the figures in the session folder.
