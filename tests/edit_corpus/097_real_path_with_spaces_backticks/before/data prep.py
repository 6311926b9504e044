import numpy as np

SCALE = 1.0
