"""Tests of tools/: the large settings' companion (tools/large.py: mapped folders, --labeled-list, --unlabeled-dir,
the on-disk teacher cache) and the scripts. CPU only, no network; customkd.py's own tests are in test_customkd.py.

    HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py tools/test_tools.py
"""

import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time

import pytest
import timm
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import large  # noqa: E402
from large import ck  # noqa: E402
from test_customkd import (  # noqa: E402, F401 (in_tmp is a fixture)
    CPU,
    ENV,
    HERE,
    TINY,
    CountingTeacher,
    folder_args,
    in_tmp,
    reference_decode,
    rows,
    run_main,
    write_folder,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short run of the demo's models, for the scripts that read a run folder."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert run_main(TINY + ["--out-dir", str(out)])[0] == 0
    return out


def run_large(argv, capsys=None, **kw):
    """tools/large.py's main() -> (exit code, summary or None, stderr)."""
    return run_main(argv, capsys, main=large.main, **kw)


def folders(tmp_path, **names):
    """folders(tmp, train="src", test="test") -> ["--train-dir", "tmp/src", "--test-dir", "tmp/test"]"""
    return [x for k, v in names.items() for x in (f"--{k}-dir", str(tmp_path / v))]


def load_mapped(root, args):
    """A folder listed and mapped as a run of tools/large.py does it -> uint8 images, labels, classes, names."""
    files, y, classes = ck.list_folder("--train-dir", str(root))
    return large.decode_folder(files, args), torch.tensor(y), classes, [os.path.relpath(f, str(root)) for f in files]


def src_args_large(tmp_path):
    """The parsed flags of a run on the folder tmp/src (training and test: only decode_folder is exercised)."""
    src = str(tmp_path / "src")
    return large.parse_args(
        folder_args(tmp_path, "--train-dir", src, "--test-dir", src, "--out-dir", str(tmp_path / "r"))
    )


# ------------------------------------------------------------------ its flags
def test_its_flags_are_checked_as_customkd_checks_its_own(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("a.png\n")
    bad = {
        "--unlabeled-dir is only for --dataset folder": TINY + ["--unlabeled-dir", str(tmp_path)],
        "--labeled-list is only for --dataset folder": TINY + ["--labeled-list", str(tmp_path / "list.txt")],
        "is not an existing folder": folder_args(
            tmp_path, "--train-dir", ".", "--test-dir", ".", "--unlabeled-dir", "x"
        ),
        "is not an existing file": folder_args(tmp_path, "--train-dir", ".", "--test-dir", ".", "--labeled-list", "x"),
    }
    for message, argv in bad.items():
        code, summary, err = run_large(argv + ["--out-dir", str(tmp_path / "r")], capsys)
        assert code == 2 and summary is None and message in err and len(err.strip().splitlines()) == 1, message
    assert not (tmp_path / "r").exists()
    assert "labeled_list" in ck.IDENTITY and "unlabeled_dir" in ck.IDENTITY  # --resume compares them too
    code, _, err = run_large(TINY + ["--epochs", "1", "--out-dir", str(tmp_path / "demo")], capsys)
    assert code == 0  # everything else is customkd.py's


# ------------------------------------------------------------------ the moved tests
def cache_run(tmp_path, name, *extra, teacher=None, capsys=None):
    """A 1-epoch --teacher-cache run into tmp/cache -> (exit code, the images the teacher saw, console)."""
    teacher = teacher or CountingTeacher()
    argv = TINY + ["--epochs", "1", "--teacher-cache", "--cache-dir", str(tmp_path / "cache"), *extra]
    code, _, _ = run_large(argv + ["--out-dir", str(tmp_path / name)], teacher=teacher)
    out = capsys.readouterr().out if capsys else ""
    return code, teacher.images, out


def test_teacher_cache_outlives_the_run_and_is_reused_for_any_seed_split_or_weights(tmp_path, capsys):
    code, seen, out = cache_run(tmp_path, "first", capsys=capsys)
    assert code == 0 and seen == 1 + 200 * 2 + 200  # the dummy forward, each training image and its flip, the test
    (path,) = (tmp_path / "cache").glob("teacher-CountingTeacher-32px-*.pt")
    assert f"once, into {path}" in out
    saved = torch.load(path, weights_only=True)
    assert saved["cache_train"].shape == (400, 24) and saved["cache_test"].shape == (200, 24)
    for i, extra in enumerate([[], ["--seed", "3"], ["--split-seed", "2"], ["--w-general", "0", "--w-sup", "2"]]):
        code, seen, out = cache_run(tmp_path, f"again{i}", *extra, capsys=capsys)
        assert code == 0 and seen == 1 and f"teacher features read from {path}" in out, extra  # the dummy forward
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_teacher_cache_is_never_stale(tmp_path, capsys):
    assert cache_run(tmp_path, "first")[:2] == (0, 601)
    weights = tmp_path / "t.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=1, patch_size=8, img_size=32).state_dict(), weights)
    timm_teacher = ["--teacher", "vit_tiny_patch16_224", "--teacher-kwargs", '{"depth": 1, "patch_size": 8}']
    changes = {  # each a teacher, weights, images or side the cache has not seen: the teacher runs again
        "other weights": dict(teacher=CountingTeacher(seed=1)),
        "other side": dict(extra=["--teacher-res", "24"]),
        "other images": dict(extra=["--synthetic-size", "160"]),
        "other precision": dict(extra=["--precision", "bf16"]),
    }
    for i, (what, change) in enumerate(changes.items()):
        extra, teacher = change.get("extra", []), change.get("teacher")
        code, seen, out = cache_run(tmp_path, f"r{i}", *extra, teacher=teacher, capsys=capsys)
        assert code == 0 and seen > 1 and "once, into" in out, what
    for i, extra in enumerate([timm_teacher, timm_teacher + ["--teacher-weights", str(weights)]]):  # a weight file
        argv = TINY + ["--epochs", "1", "--teacher-cache", "--cache-dir", str(tmp_path / "cache"), *extra]
        code, _, _ = run_large(argv + ["--out-dir", str(tmp_path / f"w{i}")])
        assert code == 0 and "once, into" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1 + len(changes) + 2


def test_teacher_cache_cut_short_is_computed_again(tmp_path, capsys):
    cache_run(tmp_path, "first")
    (path,) = (tmp_path / "cache").glob("teacher-*.pt")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # an interrupted copy, a full disk
    code, seen, out = cache_run(tmp_path, "again", capsys=capsys)
    assert code == 0 and seen == 601 and "once, into" in out and path.stat().st_size == len(whole)
    assert cache_run(tmp_path, "third")[1] == 1  # whole again: read back


def docs_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar_resnet_loads_the_release_layout_strictly_and_names_every_failure(tmp_path, monkeypatch):
    cr = docs_module("cifar_resnet")
    release = cr.cifar_resnet.__globals__["CifarResNet"](9, 100, cr.NORMALISATION["cifar100"])  # random weights
    keys = list(release.state_dict())
    assert len(keys) == 1 + 5 + 3 * 9 * 2 * 6 + 2 * 6 + 2 and "layer2.0.downsample.0.weight" in keys  # ResNet-56
    assert "layer1.0.downsample.0.weight" not in keys and release.fc.weight.shape == (100, 64)
    good = tmp_path / "cifar100_resnet56.pt"
    torch.save(release.state_dict(), good)
    model = cr.cifar_resnet("cifar100_resnet56", weights=str(good), check_hash=False)
    assert all(torch.equal(v, release.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 32, 32)
    assert ck.features(model.eval(), x).shape == (3, 64) and model.get_classifier() is model.fc
    assert timm.data.resolve_model_data_config(model)["std"] == (0.2673, 0.2564, 0.2761)
    assert ck.prepare_model(model, "teacher", 32, CPU, False)[0] == 64  # what customkd asks of a teacher
    other_keys = dict(release.state_dict(), extra=torch.zeros(1))
    other_shapes = cr.CifarResNet(9, 10, cr.NORMALISATION["cifar10"]).state_dict()
    failures = {
        "other keys": (other_keys, "cifar100_resnet56", 'Unexpected key(s) in state_dict: "extra"'),
        "other shapes": (other_shapes, "cifar100_resnet56", "size mismatch for fc.weight"),
        "wrong hash": (release.state_dict(), "cifar100_resnet56", "not the release's f2eff4c8"),
    }
    for what, (state, name, message) in failures.items():
        path = tmp_path / f"{what}.pt"
        torch.save(state, path)
        with pytest.raises(ck.Abort, match=re.escape(message)) as e:
            cr.cifar_resnet(name, weights=str(path), check_hash=what == "wrong hash")
        assert "\n" not in str(e.value), what
    with pytest.raises(ck.Abort, match="no such weight file"):
        cr.cifar_resnet("cifar100_resnet56", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ck.Abort, match="unknown CIFAR ResNet"):
        cr.cifar_resnet("cifar100_resnet57")

    def bad_download(url, **kw):  # what torch.hub raises when the downloaded file's SHA-256 is not in its name
        assert url.endswith("/resnet/cifar100_resnet56-f2eff4c8.pt") and kw["check_hash"]
        raise RuntimeError('invalid hash value (expected "f2eff4c8", got "00000000")')

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", bad_download)
    with pytest.raises(ck.Abort, match="invalid hash value"):
        cr.cifar_resnet("cifar100_resnet56")


def test_real_photo_script_runs_its_rows_skips_finished_ones_and_pairs_seeds(tmp_path, monkeypatch, capsys):
    repro = docs_module("cifar10_repro")
    assert repro.paired({0: 0.5, 1: 0.7, 2: 0.1}, {0: 0.4, 1: 0.5}).startswith("+0.1500 ± 0.0707 (t = 3.00, ahead on 2")
    classes = [f"c{i}" for i in range(10)]  # CIFAR-10's 10 classes, so that '4pc' is 40 labels
    write_folder(tmp_path / "train", classes, 4, 0, size=(32, 32))
    write_folder(tmp_path / "test", classes, 1, 1, size=(32, 32))
    torch.save({"state_dict": timm.create_model("mobilenetv3_small_050").state_dict()}, tmp_path / "student.pt")
    cr = docs_module("cifar_resnet")
    monkeypatch.setattr(repro, "teacher", lambda a: cr.CifarResNet(1, 100, cr.NORMALISATION["cifar100"]))  # ResNet-8
    argv = ["run", "--train-dir", str(tmp_path / "train"), "--test-dir", str(tmp_path / "test"), "--budget", "4pc"]
    argv += ["--student-weights", str(tmp_path / "student.pt"), "--runs", str(tmp_path / "runs"), "--rows", "none"]
    argv += ["full", "--seeds", "0", "1", "--cache-dir", str(tmp_path / "cache"), "--extra", "--epochs", "1"]
    argv += ["--batch-size", "8", "--mu", "1", "--cka-samples", "0"]
    repro.main(argv)
    assert sorted(os.listdir(tmp_path / "runs")) == ["4pc-full-0", "4pc-full-1", "4pc-none-0", "4pc-none-1"]
    args = json.load(open(tmp_path / "runs" / "4pc-full-1" / "args.json"))
    assert args["labels"] == "40" and args["seed"] == 1 and args["w_ent"] == 0.1 and args["teacher_cache"]
    assert args["epochs"] == 1 and json.load(open(tmp_path / "runs" / "4pc-none-0" / "args.json"))["w_custom"] == 0
    capsys.readouterr()
    repro.main(argv)
    assert capsys.readouterr().out.count("done before, skipped") == 4
    repro.main(["table", "--runs", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    acc = {}
    for row in ("full", "none"):
        for seed in (0, 1):
            summary = json.load(open(tmp_path / "runs" / f"4pc-{row}-{seed}" / "summary.json"))
            acc.setdefault(row, {})[seed] = summary["acc_student_last"]
    assert f"full - none: {repro.paired(acc['full'], acc['none'])}" in out and "| full |" in out
    repro.main(["table", "--runs", str(tmp_path / "runs"), "--against", str(tmp_path / "runs")])  # row by row
    assert f"full here - full in {tmp_path / 'runs'}: +0.0000 ± 0.0000" in capsys.readouterr().out
    ceiling = ["ceiling", *argv[1:5], "--budget", "4pc", "--cache-dir", str(tmp_path / "cache"), "--extra", "--mu", "1"]
    repro.main(ceiling)  # the best linear read-out of f_t on the 40 labels (tools/ceiling.py), on the test set
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ceiling 4pc: (0|1)\.\d{4} \(L2 [0-9.e-]+, 40 labels\)", line), line


def test_gpu_check_runs_in_its_tiny_cpu_mode(tmp_path, capsys):
    docs_module("gpu_check").main(["--tiny", "--out", str(tmp_path / "gpu.md")])
    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert table[0].startswith("GPU check: CPU") and "torch " in table[0] and table[2].startswith("| what |")
    rows = [line.split(" | ") for line in table[4:]]
    assert len(rows) == 1 + 4 and all(float(row[2]) > 0 for row in rows)  # a teacher, 4 stage-2 settings
    assert rows[0][0].startswith("| teacher features, vit_tiny_patch16_224") and rows[3][1] == "fp32"


def test_folder_is_decoded_once_into_a_mapped_array_and_reused(tmp_path, monkeypatch):
    write_folder(tmp_path / "src", ["cat", "dog"], 6, 0)
    args = src_args_large(tmp_path)
    x, y, classes, names = load_mapped(tmp_path / "src", args)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and classes == ["cat", "dog"]
    assert y.tolist() == [0] * 6 + [1] * 6 and names[7] == os.path.join("dog", "1.png")
    for i in (0, 7, 11):
        assert torch.equal(x[i], reference_decode(tmp_path / "src" / names[i], 32))
    cached = os.listdir(tmp_path / "cache")
    assert (
        len(cached) == 1
        and cached[0].startswith("src-32px-")
        and os.path.getsize(tmp_path / "cache" / cached[0]) == 12 * 3 * 32 * 32
    )
    with monkeypatch.context() as m:  # a second run reads the array and decodes nothing
        m.setattr(torch.utils.data, "DataLoader", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
        t = time.time()
        x2, _, _, _ = load_mapped(tmp_path / "src", args)
        assert torch.equal(x, x2) and time.time() - t < 2
    write_folder(tmp_path / "src", ["cat"], 7, 1)  # one more file: another file list, decoded anew
    x3, _, _, _ = load_mapped(tmp_path / "src", args)
    assert len(x3) == 13 and len(os.listdir(tmp_path / "cache")) == 2
    args.image_size = 16  # another image size, decoded anew
    assert load_mapped(tmp_path / "src", args)[0].shape == (13, 3, 16, 16)
    assert len(os.listdir(tmp_path / "cache")) == 3


def test_interrupted_decode_leaves_nothing_that_is_reused(tmp_path, monkeypatch):
    write_folder(tmp_path / "src", ["cat", "dog"], 300, 0, size=(20, 20))
    args = src_args_large(tmp_path)
    real = large.decode_into

    def interrupted(out, files, args):  # the first 256 images decoded, then Ctrl-C
        out[:256] = ck.decode(args.image_size, files[:256])[0]
        raise KeyboardInterrupt

    monkeypatch.setattr(large, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_mapped(tmp_path / "src", args)
    assert os.listdir(tmp_path / "cache") == []  # neither a complete-looking array nor a partial one
    monkeypatch.setattr(large, "decode_into", real)
    x, _, _, names = load_mapped(tmp_path / "src", args)
    assert torch.equal(x[599], reference_decode(tmp_path / "src" / names[599], 32))


def test_mapped_array_and_in_memory_runs_give_the_same_metrics(tmp_path, monkeypatch):
    write_folder(tmp_path / "src", ["cat", "dog"], 10, 0)
    write_folder(tmp_path / "test", ["cat", "dog"], 4, 2)
    common = folder_args(tmp_path, *folders(tmp_path, train="src", test="test"), "--labels", "50pct", "--deterministic")
    one = torch.zeros(1)
    assert ck.to_device_if_fits(one, CPU) is one  # on a CPU the pool stays the mapped array file
    assert run_large(common + ["--out-dir", str(tmp_path / "mapped")])[0] == 0
    real = large.decode_folder
    monkeypatch.setattr(large, "decode_folder", lambda *a, **k: real(*a, **k).clone())
    assert run_large(common + ["--out-dir", str(tmp_path / "memory")])[0] == 0  # the same images, copied into memory
    assert rows(tmp_path / "memory") == rows(tmp_path / "mapped") and len(rows(tmp_path / "mapped")) == 2


def test_folder_dataset_for_domain_adaptation(tmp_path):
    for d, n, s in (("src", 6, 0), ("tgt", 5, 1), ("tgt_test", 4, 2)):
        write_folder(tmp_path / d, ["cat", "dog"], n, s)
    dirs = folders(tmp_path, train="src", unlabeled="tgt", test="tgt_test", out="r")
    code, summary, _ = run_large(folder_args(tmp_path, *dirs, "--labels", "all"))
    assert code == 0 and summary["num_labeled"] == 12 and summary["num_unlabeled"] == 10
    assert summary["num_train_images"] == 22


def test_labeled_list_picks_exactly_the_listed_images(tmp_path, capsys):
    write_folder(tmp_path / "src", ["cat", "dog"], 6, 0)
    Image.new("RGB", (40, 40)).save(tmp_path / "src" / "cat" / "unique.png")
    listed = tmp_path / "list.txt"  # a bare file name (unique, as ImageNet's are) or a path under --train-dir
    listed.write_text("unique.png\ndog/4.png\n\ndog/0.png\n")
    write_folder(tmp_path / "test", ["cat", "dog"], 2, 1)
    args = folder_args(tmp_path, *folders(tmp_path, train="src", test="test"), "--labeled-list", str(listed))
    code, summary, _ = run_large(args + ["--out-dir", str(tmp_path / "r")])
    assert code == 0 and summary["num_labeled"] == 3 and summary["num_unlabeled"] == 13
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["labeled_idx"].tolist() == [6, 7, 11]
    listed.write_text("cat/2.png\nn01440764_10026.JPEG\n2.png\n")  # '2.png' is in both classes: ambiguous
    code, _, err = run_large(args + ["--out-dir", str(tmp_path / "r2")], capsys)
    assert code == 2 and "2 name(s) are not in --train-dir or are ambiguous, e.g. 'n01440764_10026.JPEG'" in err


def test_too_little_disk_for_the_array_stops_before_decoding(tmp_path, capsys, monkeypatch):
    write_folder(tmp_path / "src", ["cat", "dog"], 3, 0)
    write_folder(tmp_path / "test", ["cat", "dog"], 2, 1)
    monkeypatch.setattr(large.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    code, _, err = run_large(folder_args(tmp_path, *folders(tmp_path, train="src", test="test", out="r")), capsys)
    assert code == 2 and "6 images at 32 px need 0.0 GB in --cache-dir: 0.0 GB free" in err
    assert os.listdir(tmp_path / "cache") == []


def test_truncated_decoded_array_is_decoded_again(tmp_path, capsys):
    write_folder(tmp_path / "src", ["cat", "dog"], 4, 0)
    args = src_args_large(tmp_path)
    x = load_mapped(tmp_path / "src", args)[0].clone()  # a copy: the mapping itself would fault once cut short
    (array,) = (tmp_path / "cache").iterdir()
    with open(array, "r+b") as f:  # cut short, as by a full disk or an interrupted copy
        f.truncate(100)
    capsys.readouterr()
    x2, _, _, _ = load_mapped(tmp_path / "src", args)
    out = capsys.readouterr().out.strip().splitlines()
    assert torch.equal(x, x2) and os.path.getsize(array) == 8 * 3 * 32 * 32
    assert len(out) == 1 and out[0].startswith("customkd: decoding 8 images to 32 px, once, into ")  # says so


def test_benchmark_scripts_in_docs_run_as_their_pages_say(tmp_path, monkeypatch, capsys):
    def script(name, *argv):  # bench_folder.py measures its own process's memory: a fresh one once; else in this one
        path = os.path.join(HERE, "tools", name)
        argv = [path, *map(str, argv)]
        if argv[1:2] != ["mapped"]:
            monkeypatch.setattr(large, "decode_folder", large.decode_folder)  # bench_folder.py wraps these two:
            monkeypatch.setattr(ck, "save_epoch", ck.save_epoch)  # put them back after the test
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(path, run_name="__main__")
            return capsys.readouterr().out
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    monkeypatch.chdir(tmp_path)
    script("make_jpegs.py", tmp_path / "train", 40, 20, 16)
    script("make_jpegs.py", tmp_path / "test", 20, 20, 16, 1)
    assert len(os.listdir(tmp_path / "train")) == 10 and len(os.listdir(tmp_path / "train" / "c3")) == 4
    out = script("decode_bench.py", tmp_path / "train", 16, tmp_path / "tmp")
    assert "per-image loop:" in out and out.count("same pixels: True") == 2
    script("make_jpegs.py", tmp_path / "train", 200, 20, 16)  # 20 a class: --labels 10pct gives each class 2
    for mode in ("mapped", "memory"):
        out = script("bench_folder.py", mode, tmp_path / "train", tmp_path / "test", tmp_path / "runs" / mode)
        assert out.splitlines()[-1].startswith(f"{mode} ") and "VmHWM" in out.splitlines()[-1]
        assert (tmp_path / "runs" / mode / "student.pt").exists()


def test_export_onnx_matches_pytorch(run_dir):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnx onnxscript onnxruntime)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (the exporter needs it)")
    out = run_dir
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "tools", "export_onnx.py"), str(out), "--repeats", "5"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    diff = float(re.search(r"logit difference\| over 8 images: (\S+)", p.stdout).group(1))
    assert diff <= 1e-4 and (out / "student.onnx").stat().st_size > 10**5 and "ONNX Runtime" in p.stdout
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "tools", "export_onnx.py"), str(out), "--atol", "0", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert (p.returncode, diff > 0) in ((1, True), (0, False))  # over the tolerance: exit 1
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "tools", "export_onnx.py"), str(out / "nothing")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert p.returncode == 2 and "no student.pt" in p.stderr and "Traceback" not in p.stderr


def test_rowspace_script_measures_the_share_in_the_heads_row_space(run_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rowspace", os.path.join(HERE, "tools", "rowspace.py"))
    rowspace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rowspace)
    w = torch.eye(4)[:2] * 3  # rows span the first two of 4 dimensions
    inside, outside = torch.randn(50, 2), torch.randn(50, 2)
    assert rowspace.row_space_share(torch.cat([inside, torch.zeros(50, 2)], 1), w) == pytest.approx(1)
    assert rowspace.row_space_share(torch.cat([torch.zeros(50, 2), outside], 1), w) == pytest.approx(0, abs=1e-12)
    mixed = torch.cat([inside, outside], 1)
    expect = (inside - inside.mean(0)).pow(2).sum() / (mixed - mixed.mean(0)).pow(2).sum()
    assert rowspace.row_space_share(mixed, w) == pytest.approx(expect.item())
    out = run_dir
    rowspace.main([str(out)])
    line = capsys.readouterr().out
    shares = dict(re.findall(r"(f_t_custom|f_s) (\d\.\d{3})", line))
    assert set(shares) == {"f_t_custom", "f_s"} and all(0 < float(v) < 1 for v in shares.values())
    assert "(head: 40 rows of 1024, at random 0.039)" in line
    with pytest.raises(SystemExit, match="not a finished run folder"):
        rowspace.main([str(tmp_path)])


def test_stage2_profile_script_times_and_profiles_each_setting(capsys):
    docs_module("profile_stage2").main(["--images", "200", "--rounds", "1", "--top", "3"])
    out = capsys.readouterr().out
    for name in ("student alone", "CustomKD, cached teacher", "CustomKD, online teacher"):
        assert re.search(rf"^{name}: \d+\.\d\d s an epoch \(\d+\.\d\dx the student alone\), CPU \d", out, re.M), name
    assert "(1.00x the student alone), CPU" in out and "s (1.00x)" in out and out.count("Self CPU") >= 3
