"""A two-class image folder for issue 22's class-conditional measurement: 200 red-dominant PNGs in
``DIR/cat`` and 200 blue-dominant ones in ``DIR/dog`` (12x10 px, seed 0).

    python benchmarks/class_images/make_folder.py photos
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for cls, ch in (("cat", 0), ("dog", 2)):
    (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(200):
        a = rng.integers(0, 80, (10, 12, 3), dtype=np.uint8)
        a[..., ch] = rng.integers(170, 256, (10, 12))
        Image.fromarray(a).save(root / cls / f"{i:03d}.png")
