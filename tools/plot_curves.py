"""The demo's curves per epoch over seeds: accuracies, L_f~t, the scales of f_s and P_c(f_t), where f_s lies, CKA.

    pip install matplotlib          # only this script needs it: not in requirements.txt
    python tools/plot_curves.py RUNS OUT.png

Reads RUNS/demo-ROW-SEED/metrics.jsonl (ROW: head, full, lfc, random, lft, none), as the loop in docs/results.md
writes them; a row with no runs is left out. Thin lines are the seeds, thick lines their mean.
"""

import glob
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {
    "head": "CustomKD, head's row space",
    "full": "CustomKD, full width",
    "lfc": "L_f~t only",
    "random": "CustomKD, random head",
    "lft": "L_ft only",
    "none": "no teacher",
}
PANELS = [
    ("acc/student", "student test accuracy"),
    ("acc/teacher_custom", "acc of h(P_c(f_t))"),
    ("loss/feat_custom", "L_f~t (as each row computes it)"),
    ("rms/f_s", "RMS of f_s (test set)"),
    ("rms/f_t_custom", "RMS of P_c(f_t) (test set)"),
    ("share/f_s_in_head", "share of f_s in the head's row space"),
    ("cka/student_vs_teacher", "linear CKA of f_s and f_t"),
]


def main(runs, out):
    curves = {
        n: [[json.loads(line) for line in open(f)] for f in sorted(glob.glob(f"{runs}/demo-{n}-*/metrics.jsonl"))]
        for n in NAMES
    }
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.4))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for colour, (n, seeds) in zip(("C0", "C3", "C4", "C5", "C1", "C2"), curves.items()):
            lines = [[row.get(key) for row in rows] for rows in seeds if rows[-1].get(key) is not None]
            for c in lines:
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.3, lw=1)
            if lines:
                mean = [sum(v) / len(v) for v in zip(*lines)]
                ax.plot(range(1, len(mean) + 1), mean, color=colour, lw=2.5, label=NAMES[n])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if key.startswith("rms"):
            ax.set_yscale("log")
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), fontsize=9, loc="center")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(*sys.argv[1:3])
