"""Take a run's student to ONNX, the format edge runtimes load, and check that it answers as PyTorch does.

    pip install onnx onnxscript onnxruntime        # only this script needs them: not in requirements.txt
    python tools/export_onnx.py RUN_DIR [--batch 8] [--atol 1e-4] [--repeats 200]

Loads RUN_DIR/student.pt (with weights_only=True) and RUN_DIR/args.json (the student's timm name, keyword arguments and
input side), rebuilds the student, exports it to RUN_DIR/student.onnx (one file, batch size free), then feeds one
batch of random normalised images to both. Prints the largest absolute difference of the logits, the file size and
the median CPU latency of one image through each. Exits 1 when the difference is over --atol, 2 on bad input.
The input is the normalised image at the student's side (--student-res), as the student saw it in training.
"""

import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch


def fail(msg, code=2):
    print(f"export_onnx: error: {msg}", file=sys.stderr)
    sys.exit(code)


def latency_ms(fn, x, repeats):
    """Median wall time of fn(x) in milliseconds, after a few warm-up calls."""
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run folder holding student.pt and args.json")
    p.add_argument("--batch", type=int, default=8, help="images in the checked batch (default 8)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference (default 1e-4)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per runtime (default 200)")
    a = p.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        fail("needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime")
    paths = {k: os.path.join(a.run_dir, k) for k in ("student.pt", "args.json", "student.onnx")}
    for k in ("student.pt", "args.json"):
        if not os.path.isfile(paths[k]):
            fail(f"no {k} in {a.run_dir!r} (a finished customkd.py run folder?)")
    saved = torch.load(paths["student.pt"], map_location="cpu", weights_only=True)
    with open(paths["args.json"]) as f:
        args = json.load(f)
    if not timm.is_model(saved["model"]):
        fail(f"{saved['model']!r} is not a timm model; export your own module yourself")
    student = timm.create_model(saved["model"], num_classes=saved["num_classes"], **args["student_kwargs"])
    student.load_state_dict(saved["state_dict"])
    student.eval()
    res = args["student_res"]
    x = torch.randn(a.batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(
        student,
        (x,),
        paths["student.onnx"],
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    session = ort.InferenceSession(paths["student.onnx"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.inference_mode():
        ref = student(x)
    diff = (torch.from_numpy(session.run(None, {name: x.numpy()})[0]) - ref).abs().max().item()
    one = x[:1]
    with torch.inference_mode():
        t_torch = latency_ms(student, one, a.repeats)
    t_onnx = latency_ms(lambda v: session.run(None, {name: v}), one.numpy(), a.repeats)
    print(
        f"{paths['student.onnx']}: {os.path.getsize(paths['student.onnx']) / 2**20:.2f} MiB; {saved['model']} at "
        f"{res} px, {saved['num_classes']} classes; largest |logit difference| over {a.batch} images: {diff:.2e} "
        f"(tolerance {a.atol:g}); one image: PyTorch {t_torch:.2f} ms, ONNX Runtime {t_onnx:.2f} ms "
        f"(median of {a.repeats}, {torch.get_num_threads()} threads)"
    )
    if not diff <= a.atol:
        fail(f"the exported logits differ by {diff:.2e}, over the tolerance {a.atol:g}", 1)


if __name__ == "__main__":
    main()
