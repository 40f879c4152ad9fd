"""Where a stage-2 epoch's time goes: the student alone, with the teacher's cached features, with the online teacher.

    python tools/profile_stage2.py                         # the demo's data at 4,800 images, its models, 3 rounds
    python tools/profile_stage2.py --images 400 --rounds 1 --top 5     # seconds (the tests run this)

Each setting is one customkd run's state (customkd.setup, the demo's flags with --demo-teacher-steps 0: the same
shapes and the same cost as the pre-trained models). A warm-up epoch first, then `--rounds` rounds that time one
stage-2 epoch of each setting in turn (so that a machine's drift falls on all of them alike), then one profiled
epoch of each (torch.profiler, CPU): its most expensive operators by self time. Prints each setting's epoch in
wall seconds and in the process's CPU seconds (all threads; a virtual machine's stolen time is not in it), medians
over the rounds, and their ratios to the student alone.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402

SETTINGS = {  # what each setting adds to the demo's flags
    "student alone": ["--w-custom", "0", "--w-general", "0"],
    "CustomKD, cached teacher": ["--teacher-cache"],
    "CustomKD, online teacher": [],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4800, help="--synthetic-size: training images (default 4800)")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs of each setting (default 5)")
    p.add_argument("--top", type=int, default=12, help="operators listed per setting (default 12)")
    a = p.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for i, (name, extra) in enumerate(SETTINGS.items()):
            flags = ["--dataset", "synthetic", "--synthetic-size", str(a.images), "--demo-teacher-steps", "0"]
            kd = ck.setup(ck.parse_args(flags + extra + ["--cka-samples", "0", "--out-dir", f"{out}/{i}"]))
            ck.set_stage(kd, 2)
            ck.distill_epoch(kd, 0)  # warm-up
            runs[name] = (kd, [], [])
        for r in range(a.rounds):
            for kd, wall, cpu in runs.values():
                t = time.process_time()
                wall.append(ck.distill_epoch(kd, 1 + r)["time/distill_s"])
                cpu.append(time.process_time() - t)
        base_wall, base_cpu = (statistics.median(v) for v in runs["student alone"][1:])
        for name, (kd, wall, cpu) in runs.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ck.distill_epoch(kd, 1 + a.rounds)
            w, c = statistics.median(wall), statistics.median(cpu)
            ratios = f"{w / base_wall:.2f}x the student alone), CPU {c:.2f} s ({c / base_cpu:.2f}x)"
            print(f"{name}: {w:.2f} s an epoch ({ratios}")
            print(f"  wall {[round(t, 2) for t in wall]}, CPU {[round(t, 2) for t in cpu]}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
