import os

import matplotlib

# Tests never need a display.
os.environ.setdefault("MPLBACKEND", "Agg")
matplotlib.use("Agg")
