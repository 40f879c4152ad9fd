"""The GPU check: the speed figures that the README leaves "not yet measured", in one run of a few minutes.

    python tools/gpu_check.py [--out gpu_check.md] [--images 10000]   # on a machine with a GPU
    python tools/gpu_check.py --tiny [--out FILE]                    # a seconds-long CPU version (the tests run it)

Random weights throughout (nothing is downloaded), so the numbers are speed and memory, never accuracy. The data are
generated CIFAR-sized images (32 px) that every model sees resized to its own input side on the device, as in a real
CIFAR run. Through customkd.py's own functions, it measures:

  1. the teacher's features over every training image and its flip and the test images (what --teacher-cache
     computes once) for DINOv2-shaped ViT-S/14, ViT-B/14 and ViT-L/14 at 224 px;
  2. stage 2 of the default student (MobileNetV3-Large at 224 px) with the ViT-L/14 teacher: with the cache, without
     it (the teacher runs on every batch), in fp32, with --compile, and with no teacher at all;
  3. the same stage 2 under torchrun on every visible GPU, if there is more than one.

Stage 2 runs two epochs and reports the second (the first pays for cuDNN's autotuning and compilation). Peak memory
is the most CUDA memory allocated in the stage measured (the process's peak RSS on a CPU). It writes one markdown
table, with the GPU's name and the versions, to --out and to the console.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = ["vit_small_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m", "vit_large_patch14_dinov2.lvd142m"]


def settings(tiny, images):
    """The command-line arguments shared by every row, and the teacher names to try."""
    if tiny:  # a 1-block ViT and MobileNetV3-Small at 32 px: seconds on a CPU
        common = ["--student", "mobilenetv3_small_050", "--student-res", "32", "--teacher-res", "32", "--device", "cpu"]
        common += ["--teacher-kwargs", '{"depth": 1, "patch_size": 8}', "--batch-size", "8", "--mu", "3"]
        teachers = ["vit_tiny_patch16_224"]
    else:
        common = ["--student", "mobilenetv3_large_100", "--student-res", "224", "--teacher-res", "224"]
        common += ["--teacher-kwargs", "{}", "--batch-size", "64", "--mu", "7", "--device", "cuda"]  # not the demo's
        teachers = TEACHERS
    labels = "40" if tiny else "10pct"  # 40 classes: one labeled image each, or a tenth of each class
    data = ["--dataset", "synthetic", "--synthetic-size", str(images), "--image-size", "32", "--labels", labels]
    data += ["--demo-teacher-steps", "0", "--no-pretrained", "--epochs", "2", "--cka-samples", "0", "--overwrite"]
    return data + common, teachers


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def cache_row(argv, teacher):
    """The teacher's features of every image (the training images twice: each and its flip). -> a table row"""
    if torch.cuda.is_available():
        reset_peak(torch.device("cuda"))
    kd = ck.setup(ck.parse_args(argv + ["--teacher", teacher, "--teacher-cache", "--w-custom", "0"]))
    views = 2 * len(kd.x_pool) + len(kd.x_test)
    params = sum(p.numel() for p in kd.teacher.parameters()) / 1e6
    what = f"teacher features, {teacher.split('.')[0]} ({params:.0f} M)"
    return [what, "bf16" if kd.bf16 else "fp32", f"{views / kd.time_cache:.0f}", f"{peak_mb(kd.device):.0f}"]


def stage2_row(argv, what, extra):
    """Stage 2 twice; the second epoch's images/s and peak memory. -> a table row"""
    kd = ck.setup(ck.parse_args(argv + extra))
    ck.distill_epoch(kd, 0)  # warm-up: autotuning, compilation
    reset_peak(kd.device)
    metrics = ck.distill_epoch(kd, 1)
    setting = ("bf16" if kd.bf16 else "fp32") + (", --compile" if kd.args.compile else "")
    return [what, setting, f"{metrics['throughput/distill_img_s']:.0f}", f"{peak_mb(kd.device):.0f}"]


def torchrun_row(argv, gpus, out):
    """The same stage 2 (with the cache) under torchrun on every GPU; the second epoch of metrics.jsonl."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    cmd += [os.path.join(HERE, "customkd.py"), *argv, "--teacher-cache", "--out-dir", out]
    subprocess.run(cmd, check=True, cwd=HERE)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = [json.loads(line) for line in f][-1]
    return [f"stage 2 on {gpus} GPUs (torchrun), with the cache", "bf16", f"{row['throughput/distill_img_s']:.0f}", "-"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a seconds-long CPU version, for the tests")
    p.add_argument("--images", type=int, help="generated training images (default 10000; --tiny: 80)")
    p.add_argument("--out", default="gpu_check.md", help="the markdown table's file (default gpu_check.md)")
    a = p.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; on a CPU, --tiny runs the seconds-long version")
    images = a.images or (80 if a.tiny else 10000)
    common, teachers = settings(a.tiny, images)
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        common += ["--data-dir", tmp, "--out-dir", os.path.join(tmp, "run")]
        for teacher in teachers:
            rows.append(cache_row(common, teacher))
            print(" | ".join(rows[-1]), flush=True)
        with_teacher = ["--teacher", teachers[-1], "--w-custom", "1", "--w-general", "1"]
        stage2 = [
            (f"stage 2, {teachers[-1].split('.')[0]} from the cache", with_teacher + ["--teacher-cache"]),
            (f"stage 2, {teachers[-1].split('.')[0]} on every batch (no cache)", with_teacher),
            ("stage 2, fp32, from the cache", with_teacher + ["--teacher-cache", "--precision", "fp32"]),
            ("stage 2, no teacher (supervised + entropy)", ["--w-custom", "0", "--w-general", "0"]),
        ]
        if not a.tiny:  # compiling takes minutes on a CPU
            name = teachers[-1].split(".")[0]
            stage2.append((f"stage 2, {name} from the cache", with_teacher + ["--teacher-cache", "--compile"]))
        for what, extra in stage2:
            rows.append(stage2_row(common, what, extra))
            print(" | ".join(rows[-1]), flush=True)
        gpus = torch.cuda.device_count()
        if gpus > 1 and not a.tiny:
            rows.append(torchrun_row(common + with_teacher, gpus, os.path.join(tmp, "torchrun")))
    if torch.cuda.is_available() and not a.tiny:
        machine = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU ({os.cpu_count()} cores), --tiny"
    lines = [
        f"GPU check: {machine}; torch {torch.__version__}, timm {timm.__version__}; {images} generated training "
        f"images (32 px, resized on the device); random weights; {time.time() - t0:.0f} s in all",
        "",
        "| what | precision | images/s | peak memory (MiB) |",
        "|---|---|---|---|",
    ] + ["| " + " | ".join(row) + " |" for row in rows]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
