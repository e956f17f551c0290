import os
import sys

import matplotlib

# Tests never need a display.
os.environ.setdefault("MPLBACKEND", "Agg")
matplotlib.use("Agg")

# tests/reference.py and tests/naive.py are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))

# Tiny Hugging Face models built from configs (fixtures hf_models, texts_file).
from _hf_models import hf_models, texts_file  # noqa: E402,F401
