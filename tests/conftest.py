import os
import sys

import torch  # noqa: E402

# Triton runs its CPU interpreter where there is no GPU; the switch must be set before triton is imported
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
