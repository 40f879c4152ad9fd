"""The teacher-size sweep of docs/results.md (the paper's Fig. 1 and Table 5 in miniature): a table and a picture.

    pip install matplotlib          # only this script needs it: not in requirements.txt
    python tools/plot_sweep.py RUNS OUT.png

Reads RUNS/sweep-SIZE-{lft,head,full}-SEED/summary.json (a kind with no runs is left out) and
RUNS/sweep-none-SEED/summary.json, as the loop in docs/results.md writes them. Prints a Markdown table (mean +- std over
seeds: the customized teacher's accuracy, the students' accuracies, their gains over no teacher, and CustomKD over
L_ft only, paired by seed) and draws the gains against the teacher's size.
"""

import glob
import json
import os
import statistics
import sys

import matplotlib
import timm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = [
    ("vit-tiny-2", "ViT-Tiny, 2 blocks"),
    ("vit-tiny-4", "ViT-Tiny, 4 blocks (the demo)"),
    ("vit-small-4", "ViT-Small, 4 blocks"),
]


def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def load(pattern):
    """{seed: summary, its "args" from args.json} of the runs whose folder matches pattern (the seed is the folder's
    last '-' field)."""
    out = {}
    for p in glob.glob(pattern):
        if os.path.exists(os.path.join(p, "summary.json")):
            run = json.load(open(os.path.join(p, "summary.json")))
            run["args"] = json.load(open(os.path.join(p, "args.json")))
            out[int(p.rstrip("/").rsplit("-", 1)[1])] = run
    return out


KINDS = {"lft": ("L_ft only (plain feature KD)", "C1"), "head": ("CustomKD, head's row space", "C0")}
KINDS["full"] = ("CustomKD, full width", "C3")


def main(runs, out):
    none = {s: r["acc_student_last"] for s, r in load(f"{runs}/sweep-none-*").items()}
    params, gains = [], {}
    for key, label in SIZES:
        runs_ = {k: load(f"{runs}/sweep-{key}-{k}-*") for k in KINDS}
        runs_ = {k: v for k, v in runs_.items() if v}
        seeds = sorted(set(none).intersection(*runs_.values())) if runs_ else []
        if not seeds or "lft" not in runs_:
            continue
        if not params:
            kinds = [k for k in runs_ if k != "lft"]
            print("| teacher | parameters | `acc/teacher_custom` | `L_ft` only | gain of `L_ft` only | ", end="")
            print(" | ".join(f"{KINDS[k][0]} | its gain | it − `L_ft` only" for k in kinds) + " |")
            print("|---" * (5 + 3 * len(kinds)) + "|")
        acc = {k: [runs_[k][s]["acc_student_last"] for s in seeds] for k in runs_}
        gain = {k: [a - none[s] for a, s in zip(acc[k], seeds)] for k in runs_}
        tc = [runs_[kinds[0]][s]["acc_teacher_custom_last"] for s in seeds]
        a = runs_["lft"][seeds[0]]["args"]  # the teacher as the run built it, counted without a classifier
        teacher = timm.create_model(a["teacher"], num_classes=0, img_size=a["teacher_res"], **a["teacher_kwargs"])
        params.append(sum(p.numel() for p in teacher.parameters()))
        for k in runs_:
            gains.setdefault(k, []).append(gain[k])
        cells = [f"{ms(acc[k])} | {ms(gain[k])} | {ms([x - y for x, y in zip(acc[k], acc['lft'])])}" for k in kinds]
        print(f"| {label} | {params[-1] / 1e6:.2f} M | {ms(tc)} | {ms(acc['lft'])} | {ms(gain['lft'])} | ", end="")
        print(" | ".join(cells) + f" |  (seeds {seeds})")
    print(f"\nno teacher, seeds {sorted(none)}: {ms(list(none.values()))}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, g in gains.items():
        means = [statistics.mean(x) for x in g]
        sds = [statistics.stdev(x) if len(x) > 1 else 0 for x in g]
        ax.errorbar(
            [p / 1e6 for p in params], means, yerr=sds, marker="o", capsize=3, color=KINDS[k][1], label=KINDS[k][0]
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks([p / 1e6 for p in params], [f"{p / 1e6:.2f} M" for p in params])
    ax.set_xlabel("teacher parameters (millions)")
    ax.set_ylabel("student accuracy gain over no teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
