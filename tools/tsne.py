"""The paper's Fig. 3 in miniature: t-SNE of f_s, P_c(f_t), f_t, customized through the student's head or a random one.

    pip install scikit-learn matplotlib    # only this script needs them: not in requirements.txt
    python tools/tsne.py RUN_STUDENT_HEAD RUN_RANDOM_HEAD OUT.png

Each run folder holds features.pt, written at the end of every customkd.py run: the evaluation sample's f_s,
f_t_custom = P_c(f_t), f_t and labels y. The two runs are the same command with --custom-head student and
--custom-head random. Each panel embeds one feature set with t-SNE (scikit-learn, seed 0), coloured by class, and gives
the linear CKA of f_s with P_c(f_t) in its title.
"""

import os
import sys

import matplotlib
import torch
from sklearn.manifold import TSNE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402


def main(run_student, run_random, out):
    runs = [(run_student, "P_c through the student's head"), (run_random, "P_c through a random head")]
    fig, axes = plt.subplots(len(runs), 3, figsize=(12, 7.6))
    for row, (run, label) in zip(axes, runs):
        feats = torch.load(os.path.join(run, "features.pt"), weights_only=True)
        cka = ck.linear_cka(feats["f_s"], feats["f_t_custom"])
        for ax, (key, title) in zip(
            row,
            (("f_s", "student f_s"), ("f_t_custom", "customized teacher P_c(f_t)"), ("f_t", "original teacher f_t")),
        ):
            xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(feats[key].numpy())
            ax.scatter(xy[:, 0], xy[:, 1], c=feats["y"].numpy(), cmap="gist_rainbow", s=4)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{title}\n{label}" + (f"\nCKA(f_s, P_c(f_t)) = {cka:.3f}" if key == "f_s" else ""), fontsize=9
            )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:4])
