"""CustomKD on real photos at CPU scale: CIFAR-10 taught by a task-general teacher, a ResNet-56 trained on CIFAR-100.

    python tools/cifar10_repro.py run --train-dir cifar10/train --test-dir cifar10/test \\
        --student-weights mobilenetv3_small_050-cifar100-6ep.pt --teacher-weights cifar100_resnet56-f2eff4c8.pt \\
        --budget 1pct --rows none lft head full --seeds 0 1 2 --runs runs/real
    python tools/cifar10_repro.py run --cifar10 DATA_DIR ...       # torchvision's CIFAR-10 instead of the JPEG folders
    python tools/cifar10_repro.py table --runs runs/real           # every finished run: mean +- std, paired t
    python tools/cifar10_repro.py table --runs runs/variant --against runs/real   # a variant against the same rows
    python tools/cifar10_repro.py ceiling --train-dir ... --budget 1pct   # the best linear read-out of f_t

CIFAR-10 and CIFAR-100 share no class, so the teacher never saw the student's classes (the paper's premise about
DINOv2, in miniature). Without --teacher-weights the teacher comes from the release URL (SHA-256 checked). Every run
is customkd.main with the settings below, the same for every row, fixed before any run; a run whose summary.json
exists is skipped, so a sweep can stop and go on. Runs go one at a time: two torch processes on a few cores slow
each other down.
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402
import large  # noqa: E402
from ceiling import linear_ceiling  # noqa: E402
from cifar_resnet import cifar_resnet  # noqa: E402

SETTINGS = (  # the student: a MobileNetV3-Small-0.5 pre-trained on CIFAR-100 (--student-weights), 32 px throughout
    "--student mobilenetv3_small_050 --no-pretrained --image-size 32 --student-res 32 --teacher-res 32 "
    "--epochs 8 --batch-size 64 --mu 4 --lr 0.05 --weight-decay 5e-4 --w-ent 0.1 --teacher-cache"
).split()
ROWS = {  # the table's rows: which of the two feature losses are on, and where L_f~t compares
    "none": ["--w-custom", "0", "--w-general", "0"],  # no teacher: supervised + entropy
    "lft": ["--w-custom", "0"],  # L_ft only: plain feature distillation
    "lfc": ["--w-general", "0"],  # L_f~t only (the default --custom-space): the customized teacher alone
    "head": ["--custom-space", "head"],  # CustomKD, L_f~t in the row space of the student's head
    "full": ["--custom-space", "full"],  # CustomKD, L_f~t over all of f_s (the paper's wording)
    "random": ["--custom-head", "random"],  # CustomKD (the default --custom-space) customized through a random head
}
BUDGETS = {"1pct": "1pct", "4pc": "40"}  # 1 % of each class (50), or 4 per class (40 in all)
SIGNALS = ("acc/teacher_custom", "loss/feat_custom", "rms/f_s", "rms/f_t_custom", "share/f_s_in_head")
SIGNALS += ("cka/student_vs_custom", "cka/student_vs_teacher")


def data_args(a):
    if a.cifar10:
        return ["--dataset", "cifar10", "--data-dir", a.cifar10, "--cache-dir", a.cache_dir or a.cifar10]
    folders = ["--dataset", "folder", "--train-dir", a.train_dir, "--test-dir", a.test_dir]
    return folders + (["--cache-dir", a.cache_dir] if a.cache_dir else [])


def teacher(a):
    return cifar_resnet("cifar100_resnet56", weights=a.teacher_weights)


def run(a):
    for budget in a.budget:
        for row in a.rows:
            for seed in a.seeds:
                out = os.path.join(a.runs, f"{budget}-{row}-{seed}")
                if os.path.exists(os.path.join(out, "summary.json")):
                    print(f"{out}: done before, skipped", flush=True)
                    continue
                argv = data_args(a) + SETTINGS + ROWS[row] + ["--labels", BUDGETS[budget], "--seed", str(seed)]
                argv += ["--student-weights", a.student_weights, "--out-dir", out, "--overwrite", *a.extra]
                summary = large.main(argv, teacher=teacher(a) if row != "none" else None)
                print(f"{out}: {summary['acc_student_last']:.4f} in {summary['wall_time_s']:.0f} s", flush=True)


def mean_std(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"


def paired(a, b):
    """Paired differences a - b over the seeds both have: mean ± std, t = mean / (std / sqrt(n)), how often ahead."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return "fewer than 2 paired seeds"
    sd = statistics.stdev(d)
    t = statistics.mean(d) / (sd / math.sqrt(len(d))) if sd > 0 else math.inf
    ahead = sum(x > 0 for x in d)
    return f"{statistics.mean(d):+.4f} ± {sd:.4f} (t = {t:.2f}, ahead on {ahead} of {len(d)}; seeds {seeds})"


def finished(runs, budget, seeds):
    """(row, seed, summary.json's path) of the finished runs of one budget and of these seeds in a runs folder."""
    for path in sorted(glob.glob(os.path.join(runs, f"{budget}-*-*", "summary.json"))):
        _, row, seed = os.path.basename(os.path.dirname(path)).split("-")
        if int(seed) in seeds:
            yield row, int(seed), path


def accuracies(runs, budget, seeds):
    """{row: {seed: last-epoch accuracy}} of the finished runs of one budget and of these seeds in a runs folder."""
    acc = {}
    for row, seed, path in finished(runs, budget, seeds):
        with open(path) as f:
            acc.setdefault(row, {})[seed] = json.load(f)["acc_student_last"]
    return acc


def table(a):
    for budget in BUDGETS:
        acc, walls, epochs = {}, {}, {}
        for row, seed, path in finished(a.runs, budget, a.seeds):
            with open(path) as f:
                summary = json.load(f)
            acc.setdefault(row, {})[seed] = summary["acc_student_last"]
            walls.setdefault(row, []).append((summary["wall_time_s"], summary["time/teacher_cache_s"]))
            with open(os.path.join(os.path.dirname(path), "metrics.jsonl")) as f:
                epochs.setdefault(row, []).append([json.loads(line) for line in f])
        if not acc:
            continue
        print(f"\n### {budget}\n\n| row | per seed | mean ± std | wall a run (s) | of it, teacher features (s) |")
        print("|---|---|---|---|---|")
        for row in [r for r in ROWS if r in acc]:
            per_seed = " / ".join(f"{acc[row][s]:.4f}" for s in sorted(acc[row]))
            wall = " / ".join(f"{w:.0f}" for w, _ in walls[row])
            cache = " / ".join(f"{c:.1f}" for _, c in walls[row])
            spread = mean_std(list(acc[row].values()))
            print(f"| {row} | {per_seed} (seeds {sorted(acc[row])}) | {spread} | {wall} | {cache} |")
        pairs = [("head", "full"), ("head", "lft"), ("full", "lft"), ("head", "none"), ("full", "none")]
        pairs += [("lft", "none"), ("lfc", "none"), ("lfc", "lft"), ("random", "lft"), ("head", "random")]
        for x, y in pairs:
            if x in acc and y in acc:
                print(f"\n{x} - {y}: {paired(acc[x], acc[y])}")
        other = accuracies(a.against, budget, a.seeds) if a.against else {}  # the same rows run otherwise (a variant)
        for row in [r for r in ROWS if r in acc and r in other]:
            print(f"\n{row} here - {row} in {a.against}: {paired(acc[row], other[row])}")
        for row in [r for r in ("head", "full", "lfc", "random") if r in epochs]:
            print(f"\nper epoch, {row} (mean over seeds): " + ", ".join(SIGNALS))
            for e in range(len(epochs[row][0])):
                values = [[run[e][k] for run in epochs[row] if run[e][k] is not None] for k in SIGNALS]
                print(f"  epoch {e + 1}: " + " ".join(f"{statistics.mean(v):.3f}" if v else "-" for v in values))


def ceiling(a):
    """The best linear read-out of the teacher's f_t on each budget's labels (tools/ceiling.py), at --split-seed 0."""
    for budget in a.budget:
        argv = data_args(a) + SETTINGS + ["--labels", BUDGETS[budget], *a.extra]
        accuracy, l2, n = linear_ceiling(argv, teacher=teacher(a))
        print(f"ceiling {budget}: {accuracy:.4f} (L2 {l2}, {n} labels)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "table", "ceiling"])
    p.add_argument("--runs", default="runs/real", help="the runs' folder (default runs/real)")
    p.add_argument("--train-dir", help="CIFAR-10 JPEG class folders: train")
    p.add_argument("--test-dir", help="CIFAR-10 JPEG class folders: test")
    p.add_argument("--cifar10", help="torchvision's CIFAR-10 in (or downloaded to) this folder, instead")
    p.add_argument("--cache-dir", help="customkd's --cache-dir (decoded folders, teacher features)")
    p.add_argument("--student-weights", help="the CIFAR-100-pretrained student (student.pt of customkd.py)")
    p.add_argument("--teacher-weights", help="a local copy of cifar100_resnet56-f2eff4c8.pt (else the release URL)")
    p.add_argument("--budget", nargs="+", default=["1pct"], choices=list(BUDGETS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="training seeds (--seed; the split is --split-seed 0); table: the seeds it reads",
    )
    p.add_argument("--against", help="table: pair each row with the same row's runs in this folder (a variant's)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more customkd flags, after everything")
    a = p.parse_args(argv)
    if a.what != "table" and not (a.cifar10 or (a.train_dir and a.test_dir)):
        p.error("give --train-dir and --test-dir, or --cifar10")
    if a.what == "run" and not a.student_weights:
        p.error("run needs --student-weights")
    try:
        {"run": run, "table": table, "ceiling": ceiling}[a.what](a)
    except ck.Abort as e:
        ck.fail(*e.args)


if __name__ == "__main__":
    main()
