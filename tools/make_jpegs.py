"""Make a folder of JPEGs in 10 class folders (smooth colour patterns plus noise), for the folder benchmarks.

    python tools/make_jpegs.py ROOT N W H [SEED]

N images of W x H pixels under ROOT/c0 ... ROOT/c9. A SEED gives other images of the same 10 classes (a test folder).
"""

import os
import sys

import torch
from PIL import Image

root, n, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
protos = torch.nn.functional.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=(h, w), mode="bicubic")
if len(sys.argv) > 5:  # a second folder of the same 10 classes (a test folder): other images
    g.manual_seed(int(sys.argv[5]))
for c in range(10):
    os.makedirs(f"{root}/c{c}", exist_ok=True)
for i in range(n):
    x = (protos[i % 10] * (0.6 + 0.8 * torch.rand(1, generator=g)) + 0.1 * torch.randn(3, h, w, generator=g)).clamp(
        0, 1
    )
    Image.fromarray((x * 255).byte().permute(1, 2, 0).numpy()).save(f"{root}/c{i % 10}/{i:06d}.jpg", quality=90)
