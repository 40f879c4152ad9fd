"""Decoding speed: a per-image loop (torchvision ImageFolder + Resize + CenterCrop) against customkd's array decode.

    python tools/decode_bench.py ROOT SIZE [TMP]

Decodes the class folders under ROOT to SIZE px with the per-image loop, then with large.decode_folder and 1 and 2
worker processes (arrays under TMP, default a new temporary folder), and says whether the pixels are the same.
"""

import os
import sys
import tempfile
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import large  # noqa: E402
from large import ck  # noqa: E402

root, size = sys.argv[1], int(sys.argv[2])
tmp = sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp()
tf = torchvision.transforms.Compose(
    [torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size), torchvision.transforms.PILToTensor()]
)
t = time.perf_counter()
ds = torchvision.datasets.ImageFolder(root, transform=tf)
x_old = torch.stack([ds[i][0] for i in range(len(ds))])
print(f"per-image loop: {len(ds) / (time.perf_counter() - t):.0f} img/s")
for workers in (1, 2):
    args = large.parse_args(
        [
            "--dataset",
            "folder",
            "--train-dir",
            root,
            "--test-dir",
            root,
            "--image-size",
            str(size),
            "--workers",
            str(workers),
            "--cache-dir",
            f"{tmp}/cache-w{workers}",
            "--out-dir",
            f"{tmp}/x",
        ]
    )
    t = time.perf_counter()
    x = large.decode_folder(ck.list_folder("--train-dir", root)[0], args)
    print(f"{workers} worker(s): {len(x) / (time.perf_counter() - t):.0f} img/s, same pixels: {torch.equal(x, x_old)}")
