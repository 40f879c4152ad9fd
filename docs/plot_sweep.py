"""The teacher-size sweep of docs/results.md (the paper's Fig. 1 and Table 5 in miniature): a table and a picture.

    pip install matplotlib          # only this script needs it: not in requirements.txt
    python docs/plot_sweep.py RUNS OUT.png

Reads RUNS/sweep-SIZE-{lft,full}-SEED/summary.json and RUNS/sweep-none-SEED/summary.json, as the loop in
docs/results.md writes them. Prints a Markdown table (mean +- std over seeds: the customized teacher's accuracy, the
students' accuracies and their gains over no teacher, paired by seed) and draws the gains against the teacher's size.
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
    """{seed: summary} of the runs whose folder matches pattern (the seed is the folder's last '-' field)."""
    return {
        int(p.rstrip("/").rsplit("-", 1)[1]): json.load(open(os.path.join(p, "summary.json")))
        for p in glob.glob(pattern)
        if os.path.exists(os.path.join(p, "summary.json"))
    }


def main(runs, out):
    none = {s: r["acc_student_last"] for s, r in load(f"{runs}/sweep-none-*").items()}
    params, gains = [], {"lft": [], "full": []}
    print("| teacher | parameters | `acc/teacher_custom` | `L_ft` only | CustomKD | gain of `L_ft` only |", end="")
    print(" gain of CustomKD |")
    print("|---|---|---|---|---|---|---|")
    for key, label in SIZES:
        runs_ = {kind: load(f"{runs}/sweep-{key}-{kind}-*") for kind in ("lft", "full")}
        seeds = sorted(set(none) & set(runs_["lft"]) & set(runs_["full"]))
        if not seeds:
            continue
        acc = {k: [runs_[k][s]["acc_student_last"] for s in seeds] for k in runs_}
        gain = {k: [runs_[k][s]["acc_student_last"] - none[s] for s in seeds] for k in runs_}
        tc = [runs_["full"][s]["acc_teacher_custom_last"] for s in seeds]
        a = runs_["full"][seeds[0]]["args"]  # the teacher as the run built it, counted without a classifier
        n_params = sum(
            p.numel()
            for p in timm.create_model(
                a["teacher"], num_classes=0, img_size=a["teacher_res"], **a["teacher_kwargs"]
            ).parameters()
        )
        params.append(n_params)
        for k in gains:
            gains[k].append(gain[k])
        print(
            f"| {label} | {n_params / 1e6:.2f} M | {ms(tc)} | {ms(acc['lft'])} | {ms(acc['full'])} | "
            f"{ms(gain['lft'])} | {ms(gain['full'])} |"
        )
    print(f"\nno teacher, seeds {sorted(none)}: {ms(list(none.values()))}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, label, colour in (("lft", "L_ft only (plain feature KD)", "C1"), ("full", "CustomKD", "C0")):
        means = [statistics.mean(g) for g in gains[k]]
        sds = [statistics.stdev(g) if len(g) > 1 else 0 for g in gains[k]]
        ax.errorbar([p / 1e6 for p in params], means, yerr=sds, marker="o", capsize=3, color=colour, label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks([p / 1e6 for p in params], [f"{p / 1e6:.2f} M" for p in params])
    ax.set_xlabel("teacher parameters (millions)")
    ax.set_ylabel("student accuracy gain over no teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
