"""The share of samples whose blue channel mean exceeds their red one (class ``dog``), per ``.npy`` of
``(n, 3, H, W)`` samples in [-1, 1] (``fastat sample --out X.npy``); one JSON line each.

    python benchmarks/class_images/measure.py s-c*-g*.npy
"""

import json
import sys

import numpy as np

for f in sys.argv[1:]:
    x = np.load(f)
    blue = (x[:, 2].mean((1, 2)) > x[:, 0].mean((1, 2))).mean()
    print(json.dumps({"file": f, "n": len(x), "blue_share": float(blue)}))
