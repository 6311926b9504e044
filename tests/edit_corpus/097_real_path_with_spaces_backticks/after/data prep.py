import numpy as np

SCALE = 0.5
