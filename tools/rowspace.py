"""How much of each feature in a run's features.pt lies in the span of the student head's rows.

    python tools/rowspace.py RUN_DIR [RUN_DIR ...]

For f_t_custom = P_c(f_t) and f_s (test images, centred): the share of their energy inside the
row space of h (the student's linear classifier, from student.pt). Directions at random would give
num_classes / d_s. Uses torch only.
"""

import sys

import torch


def row_space_share(x, w):
    """Share of the centred energy of x (n, d) inside the span of the rows of w (c, d)."""
    q = torch.linalg.qr(w.double().T)[0]  # (d, c) orthonormal basis of the row space
    x = x.double() - x.double().mean(0)
    return ((x @ q).pow(2).sum() / x.pow(2).sum()).item()


def main(run_dirs):
    if not run_dirs:
        sys.exit(__doc__)
    for d in run_dirs:
        try:
            feats = torch.load(f"{d}/features.pt", weights_only=True)
            state = torch.load(f"{d}/student.pt", weights_only=True)["state_dict"]
        except (OSError, KeyError, RuntimeError) as e:
            sys.exit(f"rowspace: {d}: not a finished run folder ({type(e).__name__}: {e})")
        w = next((v for k, v in state.items() if k.endswith(("classifier.weight", "fc.weight"))), None)
        if w is None:
            sys.exit(f"rowspace: {d}: student.pt has no classifier.weight or fc.weight")
        shares = {k: row_space_share(feats[k], w) for k in ("f_t_custom", "f_s") if k in feats}
        print(
            d,
            f"(head: {w.shape[0]} rows of {w.shape[1]}, at random {w.shape[0] / w.shape[1]:.3f})",
            " ".join(f"{k} {v:.3f}" for k, v in shares.items()),
        )


if __name__ == "__main__":
    main(sys.argv[1:])
