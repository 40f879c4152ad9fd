"""The linear ceiling: the best linear read-out of the teacher's f_t on a run's labeled images, scored on its test set.

    python tools/ceiling.py --dataset synthetic --split-seed 0     # any customkd.py flags: the run's data and teacher

Stage 1 is a linear read-out of f_t through the student's head, so this bounds what `acc/teacher_custom` can reach. The
run is set up as customkd.py would (its data, its labeled split, its teacher, with --teacher-cache: each labeled image
and its mirror image), no epoch runs, and a multinomial logistic regression on the standardised features is fitted by
L-BFGS for each of five L2 weights; the best test accuracy is printed. An upper bound for stage 1, not a tuned result.
"""

import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import large  # noqa: E402
from large import ck  # noqa: E402


def linear_ceiling(argv, teacher=None):
    """-> (best test accuracy, its L2 weight, number of labeled images) for the run that argv describes."""
    with tempfile.TemporaryDirectory() as out:
        kd = large.setup([*argv, "--teacher-cache", "--out-dir", out, "--overwrite"], teacher=teacher)
    rows = torch.stack([2 * kd.labeled_idx, 2 * kd.labeled_idx + 1], 1).flatten()
    x, y = kd.cache_train[rows].float(), kd.y_pool[kd.labeled_idx].repeat_interleave(2)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (kd.cache_test.float() - mean) / std
    best = (0.0, None)
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        w = torch.zeros(x.shape[1], len(kd.y_test.unique()), requires_grad=True)
        b = torch.zeros(w.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        accuracy = ((x_test @ w + b).argmax(1) == kd.y_test).float().mean().item()
        best = max(best, (accuracy, l2))
    return best[0], best[1], len(kd.labeled_idx)


def main(argv=None):
    try:
        accuracy, l2, n = linear_ceiling(sys.argv[1:] if argv is None else argv)
    except ck.Abort as e:
        ck.fail(*e.args)
    print(f"ceiling: {accuracy:.4f} (L2 {l2}, {n} labels)")


if __name__ == "__main__":
    main()
