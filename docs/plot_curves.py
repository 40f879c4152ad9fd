"""The demo's curves per epoch over seeds: accuracies, the two feature losses, the scale of f_s and of P_c(f_t), CKA.

    pip install matplotlib          # only this script needs it: not in requirements.txt
    python docs/plot_curves.py RUNS OUT.png

Reads RUNS/demo-{full,lft,none}-SEED/metrics.jsonl, as the five-seed loop in docs/results.md writes them. Thin lines
are the seeds, thick lines their mean.
"""

import glob
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"full": "CustomKD", "lft": "L_ft only", "none": "no teacher"}
PANELS = [
    ("acc/student", "student test accuracy"),
    ("acc/teacher_custom", "acc of h(P_c(f_t))"),
    ("loss/feat_custom", "L_f~t = MSE(f_s, P_c(f_t))"),
    ("loss/feat_general", "L_ft = MSE(P_g(f_s), f_t)"),
    ("rms/f_s", "RMS of f_s (test set)"),
    ("rms/f_t_custom", "RMS of P_c(f_t) (test set)"),
    ("cka/student_vs_teacher", "linear CKA of f_s and f_t"),
]


def main(runs, out):
    curves = {
        n: [[json.loads(line) for line in open(f)] for f in sorted(glob.glob(f"{runs}/demo-{n}-*/metrics.jsonl"))]
        for n in NAMES
    }
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for colour, (n, seeds) in zip(("C0", "C1", "C2"), curves.items()):
            lines = [[row[key] for row in rows] for rows in seeds if rows[-1][key] is not None]
            for c in lines:
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.3, lw=1)
            if lines:
                mean = [sum(v) / len(v) for v in zip(*lines)]
                ax.plot(range(1, len(mean) + 1), mean, color=colour, lw=2.5, label=NAMES[n])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if key.startswith("rms"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(*sys.argv[1:3])
