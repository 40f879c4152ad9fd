"""One stage-2 epoch of a folder dataset, from the memory-mapped array or from a copy in memory; memory at its end.

    python tools/bench_folder.py mapped|memory TRAIN TEST OUT

TRAIN and TEST are class folders (e.g. from make_jpegs.py), OUT a run folder (replaced). Student only, 64 px
images seen at 32 px. Prints the stage's seconds and the process's peak, anonymous and file-backed memory (Linux).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import large  # noqa: E402
from large import ck  # noqa: E402

mode, root, test, out = sys.argv[1:5]
if mode == "memory":  # the same images, copied into the process's own memory
    real = large.decode_folder
    large.decode_folder = lambda *a: real(*a).clone()
seen, real_save = {}, ck.save_epoch
ck.save_epoch = lambda r, row: (
    seen.update(line.split(":", 1) for line in open("/proc/self/status") if ":" in line) or real_save(r, row)
)
large.main(
    [
        "--dataset",
        "folder",
        "--train-dir",
        root,
        "--test-dir",
        test,
        "--image-size",
        "64",
        "--student-res",
        "32",
        "--no-pretrained",
        "--student",
        "mobilenetv3_small_050",
        "--w-custom",
        "0",
        "--w-general",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--mu",
        "3",
        "--cka-samples",
        "0",
        "--out-dir",
        out,
        "--overwrite",
        "--cache-dir",
        os.path.join(out, "..", "decoded"),
    ]
)
row = json.loads(open(f"{out}/metrics.jsonl").readline())
print(mode, f"{row['time/distill_s']:.1f} s", {k: seen[k].strip() for k in ("VmHWM", "RssAnon", "RssFile")})
