"""Tests for customkd.py: CPU only, no network (HF_HUB_OFFLINE=1), tiny random-init models, generated data.

Run: HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py
"""

import errno
import json
import math
import os
import pickle
import re
import runpy
import signal
import subprocess
import sys
import time
import urllib.error

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm / huggingface_hub are imported

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import customkd as ck

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device("cpu")
TINY = [
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "200",
    "--labels",
    "40",
    "--epochs",
    "2",
    "--cka-samples",
    "40",
    "--demo-teacher-steps",
    "0",
    "--custom-steps",
    "0",
]  # 40 classes of 5 images, one of them labeled; 200 test images; stage 1 one pass (the demo fixture runs the default)
SMALL_MODELS = [
    "--no-pretrained",
    "--teacher",
    "vit_tiny_patch16_224",
    "--teacher-kwargs",
    '{"depth": 1, "patch_size": 8}',
]
SMALL_MODELS += ["--student", "mobilenetv3_small_050", "--teacher-res", "32", "--student-res", "32"]  # 32 px, random
RUN_FILES = ["args.json", "checkpoint.pt", "features.pt", "metrics.jsonl", "student.pt", "summary.json"]
VOLATILE = ("time/", "throughput/", "mem/")  # wall-clock measurements differ between runs by nature
WEIGHTS = {"loss/feat_custom": 1.0, "loss/feat_general": 1.0, "loss/sup": 1.0, "loss/entropy": 1.0}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=HERE)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test in its own folder: default paths (runs/, data/decoded for caches) never touch the repository."""
    monkeypatch.chdir(tmp_path)


def run_main(argv, capsys=None, main=ck.main, **kw):
    """main() (customkd's, or another entry point's) -> (exit code, summary or None, stderr)."""
    try:
        out = main(argv, **kw)
        code = 0
    except SystemExit as e:
        out, code = None, e.code
    err = capsys.readouterr().err if capsys else ""
    return code, out, err


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in f]


def tiny_kd(tmp_path, *extra, **models):
    """Everything a run holds before its first epoch: models, projectors, data, split, optimizers."""
    return ck.setup(ck.parse_args(TINY + ["--out-dir", str(tmp_path / "run"), "--overwrite", *extra]), **models)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(module, snap):
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


def cheap_compile(graphs):
    """torch.compile with a backend that only records each traced graph; fullgraph=True: a graph break fails."""
    real = torch.compile

    def compile_(fn, **kw):
        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        return real(fn, backend=backend, fullgraph=True)

    return compile_


# ------------------------------------------------------------------ labeled split
CIFAR_Y = torch.arange(50000) % 100


def test_split_10pct_and_400_are_class_balanced():
    for labels, per_class in (("10pct", 50), ("400", 4), ("1pct", 5)):
        lab = ck.split_labeled(CIFAR_Y, labels, 100, seed=0)
        assert lab.dtype == torch.long and lab.dim() == 1 and torch.equal(lab, lab.sort().values)
        assert len(lab) == 100 * per_class and len(lab.unique()) == len(lab)
        assert torch.equal(torch.bincount(CIFAR_Y[lab], minlength=100), torch.full((100,), per_class))
    all_lab = ck.split_labeled(CIFAR_Y, "all", 100, seed=0)
    assert torch.equal(all_lab, torch.arange(50000))


def test_split_is_seeded():
    a, b, c = (ck.split_labeled(CIFAR_Y, "400", 100, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("spec", ["ten", "0", "0pct", "150pct", "-5", "401", "40000000", "10 pct%"])
def test_split_rejects_bad_specs(spec):
    with pytest.raises(ck.Abort, match="--labels"):
        ck.split_labeled(CIFAR_Y, spec, 100, seed=0)
    assert not issubclass(ck.Abort, ValueError)  # a later `except ValueError` must not swallow it


# ------------------------------------------------------------------ losses and CKA
def test_losses_match_hand_computed_values():
    logits, y = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (math.e + 2))) / 2
    assert ck.loss_customize(logits, y).item() == pytest.approx(ce, rel=1e-6)
    assert ck.loss_sup(logits, y).item() == pytest.approx(ce, rel=1e-6)
    f_s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    f_t = torch.tensor([[0.0, 2.0], [3.0, 6.0]], requires_grad=True)
    for fn in (ck.loss_feat_custom, ck.loss_feat_general):
        loss = fn(f_s, f_t)
        assert loss.item() == pytest.approx((1 + 0 + 0 + 4) / 4)
        loss.backward()
        assert f_t.grad is None  # the teacher side is detached inside the loss
        assert torch.allclose(f_s.grad, torch.tensor([[0.5, 0.0], [0.0, -1.0]]))
        f_s.grad = None
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ck.loss_entropy(torch.tensor([[0.0, math.log(3)], [5.0, 5.0]])).item() == pytest.approx(
        (h + math.log(2)) / 2
    )
    assert ck.loss_entropy(torch.zeros(3, 7)).item() == pytest.approx(math.log(7), rel=1e-6)


def test_row_space_loss_by_hand_and_where_its_gradient_lies():
    w = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -3.0]])  # a head of 2 classes on 3 dimensions: rows e1 and e3
    f_s = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, 4.0]], requires_grad=True)
    f_t = torch.tensor([[0.0, 9.0, 0.0], [1.0, 0.0, 1.0]], requires_grad=True)
    loss = ck.loss_feat_custom(f_s, f_t, w)  # differences in e1, e3: (1, 2) and (-1, 3); e2 never counts
    assert loss.item() == pytest.approx((1 + 4 + 1 + 9) / 4, rel=1e-6)
    loss.backward()
    assert f_t.grad is None  # the teacher side is detached inside the loss
    assert torch.allclose(f_s.grad, torch.tensor([[0.5, 0.0, 1.0], [-0.5, 0.0, 1.5]]), atol=1e-6)
    g = gen()
    w = torch.randn(4, 12, generator=g)  # 4 classes, d_s = 12
    q = torch.linalg.qr(w.T)[0]
    f_t = torch.randn(6, 12, generator=g)
    for scale in (1e-3, 1.0, 1e4):  # f_s - f~_t orthogonal to every row of the head: zero, whatever its size
        off = scale * (torch.randn(6, 12, generator=g) @ (torch.eye(12) - q @ q.T))
        assert ck.loss_feat_custom(f_t + off, f_t, w).item() == pytest.approx(0.0, abs=1e-8 * scale**2 + 1e-10)
        assert ck.loss_feat_custom(f_t + off, f_t).item() > 0.01 * scale**2  # full width counts it
    f_s = torch.randn(6, 12, generator=g, requires_grad=True)
    ck.loss_feat_custom(f_s, f_t, w).backward()
    assert f_s.grad.norm() > 0 and torch.allclose(f_s.grad @ q @ q.T, f_s.grad, atol=1e-6)  # in the row space
    same_space = torch.randn(4, 4, generator=g) @ w  # another basis of the same rows: the same loss
    assert ck.loss_feat_custom(f_s, f_t, same_space).item() == pytest.approx(ck.loss_feat_custom(f_s, f_t, w).item())


def test_linear_cka_values_and_invariances():
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [4.0]])
    assert ck.linear_cka(x, y) == pytest.approx(81 / 84)  # 1-d CKA = squared correlation, by hand
    g = gen()
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    b = b + a[:, :5]
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    base = ck.linear_cka(a, b)
    assert 0 < base < 1 and ck.linear_cka(a, a) == pytest.approx(1.0)
    assert ck.linear_cka(3.7 * a, b) == pytest.approx(base)  # isotropic scaling
    assert ck.linear_cka(a @ q, b) == pytest.approx(base)  # orthogonal rotation
    assert ck.linear_cka(a + 5.0, b) == pytest.approx(base)  # translation (centred)
    assert ck.linear_cka(a, torch.randn(50, 3, generator=g)) < 0.5


# ------------------------------------------------------------------ the two stages
def test_stage1_changes_only_the_customization_projector(tmp_path):
    kd = tiny_kd(tmp_path)
    kd.args.batch_size, kd.opt_custom = 8, torch.optim.Adam(kd.proj_custom.parameters(), lr=1e-2)
    before = {m: snapshot(getattr(kd, m)) for m in ("teacher", "student", "proj_general", "proj_custom")}
    calls = []
    hook = kd.student.get_classifier().register_forward_hook(lambda *a: calls.append(1))
    means = ck.customize_epoch(kd, 0)
    hook.remove()
    assert list(means) == ["loss/customize", "time/customize_s", "throughput/customize_img_s"]
    assert math.isfinite(means["loss/customize"]) and means["time/customize_s"] > 0
    n_img = means["throughput/customize_img_s"] * means["time/customize_s"]
    assert n_img == pytest.approx(40) and len(calls) == 5  # 40 labeled, batch 8 -> 5 steps, each through h
    assert kd.head_c is kd.student.get_classifier()
    for m in ("teacher", "student", "proj_general"):
        assert same(getattr(kd, m), before[m]), m
    assert not same(kd.proj_custom, before["proj_custom"])
    assert ck.build_parser().get_default("custom_steps") == 50  # the default: at least 50 steps an epoch
    for custom_steps, steps in ((12, 12), (2, 5)):  # --custom-steps: at least that many steps (D_L cycled), or a pass
        kd.args.custom_steps, calls = custom_steps, []
        hook = kd.head_c.register_forward_hook(lambda *a: calls.append(1))
        means = ck.customize_epoch(kd, 1)
        hook.remove()
        n_img = means["throughput/customize_img_s"] * means["time/customize_s"]
        assert len(calls) == steps and n_img == pytest.approx(8 * steps)


def test_random_custom_head_is_not_the_student_head(tmp_path):
    kd = tiny_kd(tmp_path, "--custom-head", "random", "--batch-size", "8")
    assert kd.head_c is not kd.head and not any(p.requires_grad for p in kd.head_c.parameters())
    calls, rnd = [], snapshot(kd.head_c)
    kd.head.register_forward_hook(lambda *a: calls.append("student"))
    kd.head_c.register_forward_hook(lambda *a: calls.append("random"))
    ck.customize_epoch(kd, 0)
    assert calls == ["random"] * 5 and same(kd.head_c, rnd)  # 40 labeled, batch 8: 5 steps


def test_stage2_never_changes_teacher_or_customization_projector(tmp_path):
    kd = tiny_kd(tmp_path, "--lr", "0.05")
    before = {m: snapshot(getattr(kd, m)) for m in ("teacher", "proj_custom", "student", "proj_general")}
    terms = ck.distill_epoch(kd, 0)
    assert set(terms) == set(WEIGHTS) | {"time/distill_s", "throughput/distill_img_s"}
    assert all(math.isfinite(v) for v in terms.values())
    n_img = terms["throughput/distill_img_s"] * terms["time/distill_s"]
    assert n_img == pytest.approx(4 * (16 + 48))  # 200 unlabeled // 48 = 4 steps of 16 labeled + 48 unlabeled
    assert same(kd.teacher, before["teacher"]) and same(kd.proj_custom, before["proj_custom"])
    assert not same(kd.student, before["student"]) and not same(kd.proj_general, before["proj_general"])
    assert not same(kd.head, {k.split("classifier.")[1]: v for k, v in before["student"].items() if "classifier." in k})
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())


@pytest.mark.parametrize("space, head", [("head", "student"), ("head", "random"), ("full", "student")])
def test_custom_space_compares_where_the_stage1_head_reads(tmp_path, monkeypatch, space, head):
    kd = tiny_kd(tmp_path, "--custom-space", space, "--custom-head", head, "--lr", "0.05")
    seen, real = [], ck.loss_feat_custom
    monkeypatch.setattr(
        ck, "loss_feat_custom", lambda f_s, f_t_custom, w=None: seen.append(w) or real(f_s, f_t_custom, w)
    )
    before = {m: snapshot(getattr(kd, m)) for m in ("teacher", "proj_custom", "student", "proj_general", "head_c")}
    terms = ck.distill_epoch(kd, 0)
    assert len(seen) == 4 and math.isfinite(terms["loss/feat_custom"])  # 4 steps, each with L_f~t
    expected = {"full": None, "head": kd.head_c.weight}[space]  # the head stage 1 reads through, random or h
    assert all(w is expected for w in seen)
    assert (kd.head_c is kd.head) == (head == "student")
    for m in ("teacher", "proj_custom", "head_c" if head == "random" else "teacher"):
        assert same(getattr(kd, m), before[m]), m
    assert not same(kd.student, before["student"]) and not same(kd.proj_general, before["proj_general"])
    assert ck.build_parser().get_default("custom_space") == "head"  # decided by the rule in docs/results.md


def test_projector_ends_with_student_activation(tmp_path):
    kd = tiny_kd(tmp_path)
    assert isinstance(kd.proj_custom[1], nn.Hardswish) and kd.proj_custom[0].in_features == 192
    assert kd.proj_custom[0].out_features == kd.head.in_features == kd.proj_general.in_features
    kd = tiny_kd(tmp_path, student=TinyNet(16, num_classes=ck.DEMO_CLASSES))  # pre-logits out of a pooling layer
    assert isinstance(kd.proj_custom[1], nn.Identity) and kd.proj_custom[0].out_features == 16


def test_teacher_cache_equals_fresh_features(tmp_path):
    kd = tiny_kd(tmp_path)
    kd.x_pool, kd.x_test, kd.batch_eval = kd.x_pool[:30], kd.x_test[:10], 8  # 8 images a batch
    ck.build_teacher_cache(kd, with_train=True)
    assert kd.cache_train.shape == (60, 192) and kd.cache_test.shape == (10, 192)
    assert kd.cache_train.dtype == torch.float32  # fp32 run: fp32 cache
    x = kd.x_pool
    plain, flipped = (ck.teacher_features(kd, x=v.float()) for v in (x, x.flip(-1)))
    # batches of 8 against one of 30: other kernels, other rounding, so a tolerance; a wrong view is 1e-2 away
    assert torch.allclose(kd.cache_train[0::2], plain, atol=1e-4, rtol=1e-4)
    assert torch.allclose(kd.cache_train[1::2], flipped, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, flipped, atol=1e-2)
    plan = torch.tensor([[3, 0, 0, 1], [4, 0, 0, 0], [5, 0, 0, 1]])
    got = ck.teacher_features(kd, plan)  # the planned flip picks the cached view
    assert torch.equal(got, torch.stack([kd.cache_train[7], kd.cache_train[8], kd.cache_train[11]]))


def test_with_the_cache_no_stage_and_no_evaluation_runs_the_teacher(tmp_path):
    kd = tiny_kd(tmp_path)
    ck.build_teacher_cache(kd, with_train=True)

    def teacher_ran(x):
        raise AssertionError("the teacher ran")

    kd.feat_t = teacher_ran
    ck.customize_epoch(kd, 0)
    ck.distill_epoch(kd, 0)
    out = ck.evaluate(kd)
    assert set(out) == {
        "acc/student",
        "acc/teacher_custom",
        "cka/student_vs_custom",
        "cka/student_vs_teacher",
        "rms/f_s",
        "rms/f_t_custom",
        "share/f_s_in_head",
        "time/eval_s",
        "throughput/eval_img_s",
    }
    assert out["throughput/eval_img_s"] * out["time/eval_s"] == pytest.approx(len(kd.x_test)) and len(kd.x_test) == 200
    with torch.no_grad():  # the share of f_s's centred energy in the row space of h, by hand: projection onto rows
        f_s = ck.features(kd.student.eval(), kd.view_s(kd.x_test.float()))
        f_s = f_s - f_s.mean(0)
        w = kd.head.weight
        projected = f_s @ w.T @ torch.linalg.inv(w @ w.T) @ w  # the orthogonal projection onto the rows of w
    assert out["share/f_s_in_head"] == pytest.approx((projected.pow(2).sum() / f_s.pow(2).sum()).item(), rel=1e-3)
    assert 0 < out["share/f_s_in_head"] < 1


@pytest.mark.parametrize("size", [8, 32, 64])
def test_augment_crops_by_an_eighth_of_the_side_and_flips(size):
    x = torch.randint(0, 256, (3, 3, size, size), generator=gen(), dtype=torch.uint8)
    pad = size // 8
    plan = torch.tensor([[0, 0, 0, 0], [1, 2 * pad, pad, 1], [2, pad, 2 * pad, 0]])
    out = ck.augment(x, plan, CPU)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(x.float(), (pad,) * 4, mode="reflect")
    for b, (i, dy, dx, flip) in enumerate(plan.tolist()):
        ref = padded[i, :, dy : dy + size, dx : dx + size]
        assert torch.equal(out[b], ref.flip(-1) if flip else ref)


def test_epoch_plan_is_a_seeded_function_of_its_generator():
    a, b = (ck.epoch_plan(torch.arange(10, 20), 4, 5, gen(3), pad=4) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (5, 4, 4)
    ids = a[..., 0].flatten()
    assert sorted(ids[:10].tolist()) == list(range(10, 20))  # a permutation, then the next one
    assert a[..., 1:3].min() >= 0 and a[..., 1:3].max() <= 8 and set(a[..., 3].flatten().tolist()) <= {0, 1}


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The offline demo as the README ships it (its data, models, pre-training and settings), cut to 6 of its 16
    epochs and 200 of its teacher's 2000 pre-training steps for the suite's time; run once for the tests that read
    its outputs."""
    out = tmp_path_factory.mktemp("demo") / "run"
    cache = ["--cache-dir", str(out.parent / "cache")]  # its pre-trained models: never in the repository's data/
    cut = ["--epochs", "6", "--demo-teacher-steps", "200"]
    code, summary, _ = run_main(["--dataset", "synthetic", *cut, "--out-dir", str(out), *cache])
    return code, summary, out


def test_demo_writes_every_output_and_learns(demo):
    code, summary, out = demo
    assert code == 0
    assert sorted(os.listdir(out)) == RUN_FILES
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert set(lines[-1]) == set(ck.METRIC_KEYS) and all(lines[-1][k] is not None for k in ck.METRIC_KEYS)
    # Wide margins, whatever the CPU's kernels: chance is 0.025 (40 classes). Cut to 6 epochs and a 200-step teacher,
    # seed 0 ended at 0.110 and the customized teacher (a linear probe on the pre-trained teacher) at 0.320, on an AMD
    # CPU with AVX-512. A run's path varies by CPU: the bars are multiples of chance, not levels; and the loss falls.
    assert summary["acc_student_last"] == lines[-1]["acc/student"] > 2 * 0.025
    assert summary["acc_teacher_custom_last"] > 4 * 0.025
    assert lines[-1]["loss/sup"] < lines[0]["loss/sup"]
    assert summary["acc_student_best"] == max(r["acc/student"] for r in lines)
    assert lines[-1]["loss/feat_general"] < lines[0]["loss/feat_general"]  # a healthy run: feature loss falls
    for r in lines:  # stage 1 at the default --custom-steps 50: 50 batches of 16 of the 160 labeled images an epoch
        assert r["throughput/customize_img_s"] * r["time/customize_s"] == pytest.approx(50 * 16)
    assert summary["num_labeled"] == 160 and summary["num_unlabeled"] == 1600 and summary["epochs"] == 6
    assert json.load(open(out / "summary.json"))["acc_student_last"] == summary["acc_student_last"]
    assert json.load(open(out / "args.json"))["labels"] == "160"
    student = torch.load(out / "student.pt", weights_only=True)
    assert student["model"] == "mobilenetv3_small_050" and student["num_classes"] == 40
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 6 and "teacher" not in ckpt and len(ckpt["labeled_idx"]) == 160
    # the scale of the student's feature and of the customized target, and the evaluation sample for the pictures
    feats = torch.load(out / "features.pt", weights_only=True)
    assert sorted(feats) == ["f_s", "f_t", "f_t_custom", "y"] and feats["y"].shape == (1000,)
    assert feats["f_s"].shape == feats["f_t_custom"].shape == (1000, 1024) and feats["f_t"].shape == (1000, 192)
    assert set(feats["y"].tolist()) == set(range(ck.DEMO_CLASSES))
    assert all(r["rms/f_s"] > 0 and r["rms/f_t_custom"] > 0 for r in lines)
    assert lines[-1]["rms/f_t_custom"] == pytest.approx(feats["f_t_custom"].pow(2).mean().sqrt().item(), rel=1e-4)
    assert lines[-1]["rms/f_s"] == pytest.approx(feats["f_s"].pow(2).mean().sqrt().item(), rel=1e-4)
    assert ck.linear_cka(feats["f_s"], feats["f_t"]) == pytest.approx(lines[-1]["cka/student_vs_teacher"], abs=1e-6)


def test_demo_models_are_pre_trained_then_the_teacher_is_frozen(tmp_path, monkeypatch):
    kd = tiny_kd(tmp_path)
    assert len(ck.load_data(kd.args)["teacher_x"]) == 0  # --demo-teacher-steps 0: no pre-training images made
    kd.args.demo_teacher_steps = 20
    data, teacher, student = ck.load_data(kd.args), snapshot(kd.teacher), snapshot(kd.student)
    adam, rates, seen, real = torch.optim.Adam, [], [], ck.pretrain
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: rates.append(lr) or adam(params, lr=lr))

    def learn(kd, model, view, d, x, y, steps, *rest):  # records what each model learns, and for how many steps
        seen.append((len(x), int(y.min()), int(y.max()), steps))
        return real(kd, model, view, d, x, y, steps, *rest)

    monkeypatch.setattr(ck, "pretrain", learn)
    ck.pretrain_demo_models(kd, data["teacher_x"], data["teacher_y"], 20)
    assert seen == [(16000, 40, 439, 20), (4000, 40, 139, 2)]  # all 400 other classes; the first 100, 1/8 the steps
    assert not same(kd.teacher, teacher) and not same(kd.student, student)
    assert rates == [1e-3, 3e-3]  # the teacher, then the student (a faster rate: a stronger start, in the same time)
    assert len(data["teacher_x"]) == 40 * ck.DEMO_TEACHER_CLASSES
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert kd.student.training and all(p.requires_grad for p in kd.student.parameters())  # ready for stage 2
    kd = tiny_kd(tmp_path)  # your own student (passed to main): used as given; the demo teacher is still pre-trained
    teacher, student = snapshot(kd.teacher), snapshot(kd.student)
    ck.pretrain_demo_models(kd, data["teacher_x"], data["teacher_y"], 20, own=(None, kd.student))
    assert not same(kd.teacher, teacher) and same(kd.student, student)


def test_demo_models_are_pre_trained_once_by_recipe_then_read_back(tmp_path, monkeypatch, capsys):
    """As a hub keeps downloads: built once into --cache-dir, read back (the pre-training does not run again, and the
    run is the same), built anew for another recipe or when the file is cut short."""
    made = []
    real = ck.pretrain
    monkeypatch.setattr(ck, "pretrain", lambda kd, model, *a: made.append(type(model).__name__) or real(kd, model, *a))
    cache = tmp_path / "cache"

    def demo(name, steps):  # -> (exit code, the models pre-trained in this run, its console)
        made.clear()
        argv = TINY + ["--epochs", "1", "--demo-teacher-steps", str(steps), "--cache-dir", str(cache)]
        code, _, _ = run_main(argv + ["--out-dir", str(tmp_path / name)])
        return code, list(made), capsys.readouterr().out

    code, built, out = demo("first", 16)
    files = sorted(cache.glob("demo-*.pt"))
    assert code == 0 and built == ["VisionTransformer", "MobileNetV3"] and len(files) == 2
    assert (
        "demo teacher (16 steps on 16000 images of other classes), once, into" in out
        and "demo student (2 steps on 4000 images" in out
    )
    assert not list(cache.glob("*.tmp"))  # written atomically: nothing half-written left
    code, built, out = demo("again", 16)
    assert (
        code == 0
        and built == []
        and out.count("read from") == 2
        and rows(tmp_path / "again") == rows(tmp_path / "first")
    )
    assert demo("other", 24)[1] == ["VisionTransformer", "MobileNetV3"] and len(list(cache.glob("demo-*.pt"))) == 4
    teacher = next(f for f in files if f.name.startswith("demo-teacher"))
    teacher.write_bytes(teacher.read_bytes()[:1000])  # an interrupted copy, a full disk
    assert demo("cut", 16)[1] == ["VisionTransformer"] and teacher.stat().st_size > 1000


def test_demo_teacher_is_pre_trained_on_other_classes_than_the_students(tmp_path):
    """Task-general, as a foundation model: none of the demo teacher's classes is one of the student's."""
    data = ck.load_data(ck.parse_args(["--dataset", "synthetic", "--out-dir", str(tmp_path / "r")]))
    student = set(data["train_y"].tolist()) | set(data["test_y"].tolist())
    teacher = set(data["teacher_y"].tolist())
    assert student == set(range(ck.DEMO_CLASSES)) and len(data["classes"]) == ck.DEMO_CLASSES
    assert teacher == set(range(ck.DEMO_CLASSES, ck.DEMO_CLASSES + ck.DEMO_TEACHER_CLASSES)) and not student & teacher
    # the classes differ in content: each teacher class's mean image is far from every student class's mean image
    means = {
        c: data[x][data[y] == c].float().mean(0)
        for x, y, cs in (("train_x", "train_y", student), ("teacher_x", "teacher_y", teacher))
        for c in cs
    }
    gaps = [(means[a] - means[b]).abs().mean().item() for a in teacher for b in student]
    assert min(gaps) > 5  # grey levels, out of 255
    args = ck.parse_args(["--dataset", "synthetic", "--out-dir", str(tmp_path / "r")])  # the teacher is the larger
    teacher, student = (
        sum(p.numel() for p in ck.create_model(args, r, 0).parameters()) for r in ("teacher", "student")
    )
    assert teacher > 2 * student


def test_console_prints_one_aligned_line_per_epoch(tmp_path, capsys):
    code, _, _ = run_main(TINY + ["--epochs", "3", "--out-dir", str(tmp_path / "r")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert code == 0 and len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert [line.index("|") for line in lines] == [lines[0].index("|")] * 3


def test_baseline_without_feature_losses_never_builds_the_teacher(tmp_path, monkeypatch):
    built = []
    real = ck.create_model
    monkeypatch.setattr(ck, "create_model", lambda args, role, *a: built.append(role) or real(args, role, *a))
    code, summary, _ = run_main(TINY + ["--w-custom", "0", "--w-general", "0", "--out-dir", str(tmp_path / "b")])
    assert code == 0 and built == ["student"]
    row = json.loads(open(tmp_path / "b" / "metrics.jsonl").readline())
    assert row["loss/feat_custom"] is None and row["acc/teacher_custom"] is None and row["loss/customize"] is None
    assert summary["acc_teacher_custom_last"] is None


def test_runs_with_and_without_stage1_see_the_same_stage2_batches(tmp_path, monkeypatch):
    seen = []
    real = ck.distill_step
    monkeypatch.setattr(
        ck, "distill_step", lambda kd, x, y_l, f_t: seen.append(x.sum().item()) or real(kd, x, y_l, f_t)
    )
    for name, extra in (("full", []), ("base", ["--w-custom", "0", "--w-general", "0"])):
        assert run_main(TINY + extra + ["--out-dir", str(tmp_path / name)])[0] == 0
    assert len(seen) == 16 and seen[:8] == seen[8:]


def test_custom_every_skips_stage1(tmp_path):
    code, _, _ = run_main(TINY + ["--epochs", "3", "--custom-every", "2", "--out-dir", str(tmp_path / "c")])
    assert code == 0 and [r["loss/customize"] is None for r in rows(tmp_path / "c")] == [False, True, False]


def test_teacher_cache_run(tmp_path):
    code, summary, _ = run_main(TINY + ["--teacher-cache", "--out-dir", str(tmp_path / "c")])
    assert code == 0 and summary["acc_teacher_custom_last"] is not None and summary["time/teacher_cache_s"] > 0


class CountingTeacher(nn.Module):
    """A teacher (not from timm) that counts the images it is asked for: 1 is the dummy forward that sizes f_t."""

    def __init__(self, seed=0, width=24):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU())
        self.images = 0

    def forward_features(self, x):
        self.images += len(x)
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


# ------------------------------------------------------------------ bf16, channels_last and torch.compile on the CPU
def test_bf16_on_the_cpu_runs_the_gpu_lines(tmp_path):
    kd32 = tiny_kd(tmp_path)
    kd16 = tiny_kd(tmp_path, "--precision", "bf16")
    assert (
        kd16.bf16 and not kd32.bf16 and kd16.student.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    )
    lab, unl = kd32.labeled_idx, kd32.unlabeled_idx
    x = ck.augment(
        kd32.x_pool,
        torch.cat([ck.epoch_plan(lab, 16, 1, gen(), kd32.pad)[0], ck.epoch_plan(unl, 48, 1, gen(), kd32.pad)[0]]),
        CPU,
    )
    dtypes = []
    kd16.student.conv_stem.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    terms = {}
    for name, kd in (("fp32", kd32), ("bf16", kd16)):
        terms[name] = ck.distill_step(kd, x, kd.y_pool[lab[:16]], ck.teacher_features(kd, x=x))
        assert all(v.dtype == torch.float32 for v in terms[name].values())  # losses in fp32, whatever the precision
    assert dtypes == [torch.bfloat16]  # the student ran under bf16 autocast
    for k in WEIGHTS:  # the same first-step losses within 3 %, but not bit-equal: bf16 did run
        assert terms["bf16"][k].item() == pytest.approx(terms["fp32"][k].item(), rel=0.03), k
        assert terms["bf16"][k].item() != terms["fp32"][k].item(), k
    kd16.x_pool, kd16.x_test, kd16.batch_eval = kd16.x_pool[:20], kd16.x_test[:8], 8
    ck.build_teacher_cache(kd16, with_train=True)
    assert kd16.cache_train.dtype == kd16.cache_test.dtype == torch.bfloat16
    assert ck.teacher_features(kd16, torch.tensor([[3, 0, 0, 1]])).dtype == torch.float32


@pytest.mark.parametrize("cache", [[], ["--teacher-cache"]])
def test_bf16_demo_pipeline_end_to_end(tmp_path, cache):
    """The whole pipeline in bf16 against the same run in fp32: finite, and the same first-epoch losses within 10 %.
    No accuracy threshold: a short run's accuracy depends on the CPU's kernels."""
    for precision in ("fp32", "bf16"):
        code, summary, _ = run_main(
            TINY
            + [
                "--precision",
                precision,
                "--epochs",
                "2",
                "--synthetic-size",
                "80",
                "--out-dir",
                str(tmp_path / precision),
            ]
            + cache
        )  # 1 step an epoch
        args = json.load(open(tmp_path / precision / "args.json"))  # the arguments, saved once
        assert code == 0 and 0 <= summary["acc_student_last"] <= 1 and args["precision"] == precision
    fp32, bf16 = rows(tmp_path / "fp32"), rows(tmp_path / "bf16")
    assert len(bf16) == 2 and all(math.isfinite(row[k]) for row in bf16 for k in [*WEIGHTS, "loss/customize"])
    for k in [*WEIGHTS, "loss/customize"]:
        assert bf16[0][k] == pytest.approx(fp32[0][k], rel=0.1), k


def test_compile_path_traces_full_graphs_and_never_recompiles(tmp_path, monkeypatch):
    graphs, per_epoch = [], []
    monkeypatch.setattr(torch, "compile", cheap_compile(graphs))
    real_line = ck.console_line
    monkeypatch.setattr(ck, "console_line", lambda row, n: per_epoch.append(len(graphs)) or real_line(row, n))
    torch._dynamo.reset()
    code, _, err = run_main(TINY + ["--compile", "--epochs", "3", "--out-dir", str(tmp_path / "r")])
    assert code == 0, err
    assert 2 <= per_epoch[0] <= 8 and per_epoch[1] == per_epoch[2] == per_epoch[0]  # epochs 2 and 3 trace nothing


# ------------------------------------------------------------------ CIFAR on-disk format
def write_cifar100(root, n_train=300, n_test=100):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    g = gen()
    for name, n in (("train", n_train), ("test", n_test)):
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"]}, f)
    return data


@pytest.fixture
def no_md5(monkeypatch):
    """Our files cannot match the real archive's md5 sums; everything else is torchvision's own reader."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar100_loads_from_torchvision_files(tmp_path, no_md5):
    test_data = write_cifar100(tmp_path)
    x, y, classes = ck.load_cifar("cifar100", str(tmp_path), train=False)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and len(classes) == 100
    assert torch.equal(x[7], torch.from_numpy(test_data[7]).view(3, 32, 32)) and y[7] == 7
    code, summary, _ = run_main(
        [
            "--dataset",
            "cifar100",
            "--data-dir",
            str(tmp_path),
            "--labels",
            "100",
            "--epochs",
            "1",
            *SMALL_MODELS,
            "--batch-size",
            "50",
            "--mu",
            "2",
            "--out-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0 and summary["num_labeled"] == 100 and summary["num_unlabeled"] == 300


def test_cifar_missing_offline_fails_fast(tmp_path, capsys):
    t = time.time()
    code, _, err = run_main(
        ["--dataset", "cifar100", "--no-pretrained", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "r")],
        capsys,
    )
    assert code == 2 and time.time() - t < 10  # before any model is built
    assert "cifar-100-python.tar.gz" in err and "--data-dir" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_cifar_download_failure_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_net(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_net)
    argv = "--dataset cifar10 --no-pretrained --student mobilenetv3_small_050 --w-custom 0 --w-general 0".split()
    code, _, err = run_main(argv + ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "URLError" in err and "cifar-10-python.tar.gz" in err and "cifar-10-batches-py" in err


# ------------------------------------------------------------------ models and weights
def test_pretrained_offline_names_every_way_out(tmp_path, capsys):
    t = time.time()
    code, _, err = run_main(TINY + ["--pretrained", "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and time.time() - t < 30 and len(err.strip().splitlines()) == 1
    for hint in ("--no-pretrained", "--teacher-weights", "--student-weights", "HF_HUB_OFFLINE=1"):
        assert hint in err


def test_local_weight_files_load_through_timm(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", depth=1, patch_size=8, img_size=64, num_classes=0)
    torch.save(src.state_dict(), tmp_path / "t.pth")
    args = ck.parse_args(
        [
            "--dataset",
            "synthetic",
            "--teacher",
            "vit_tiny_patch16_224",
            "--teacher-res",
            "32",
            "--teacher-kwargs",
            '{"depth": 1, "patch_size": 8}',
            "--teacher-weights",
            str(tmp_path / "t.pth"),
            "--student-weights",
            str(tmp_path / "t.pth"),
            "--out-dir",
            str(tmp_path / "r"),
        ]
    )
    t = ck.create_model(args, "teacher", 0)
    assert t.pos_embed.shape == (1, 1 + 16, 192) != src.pos_embed.shape  # resampled from 8x8 to 4x4 patches
    assert torch.equal(t.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    s_src = timm.create_model("mobilenetv3_small_050", num_classes=1000)
    torch.save(s_src.state_dict(), tmp_path / "s.pth")
    args.student_weights = str(tmp_path / "s.pth")
    s = ck.create_model(args, "student", 10)
    assert torch.equal(s.conv_stem.weight, s_src.conv_stem.weight) and s.get_classifier().out_features == 10


class TinyNet(nn.Module):
    """A model that is not from timm, with the three methods customkd needs."""

    def __init__(self, width, num_classes=0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc


def test_hooks_give_the_data_and_keep_the_teacher_features(tmp_path):
    made = {}

    def data(args):  # the data a run is given, with its own labeled and unlabeled sets
        return ck.load_data(args) | {"labeled_idx": torch.tensor([0, 5]), "unlabeled_idx": torch.arange(100, 200)}

    def keep(kd, make):  # the teacher's features: made here, kept wherever the hook likes
        made.update(make())
        return made

    argv = TINY + ["--teacher-cache", "--epochs", "1", "--out-dir", str(tmp_path / "r")]
    code, summary, _ = run_main(argv, data=data, keep_features=keep)
    assert code == 0 and summary["num_labeled"] == 2 and summary["num_unlabeled"] == 100
    assert made["cache_train"].shape == (400, 192) and made["cache_test"].shape == (200, 192)
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["labeled_idx"].tolist() == [0, 5]


def test_bring_your_own_models(tmp_path):
    teacher, student = TinyNet(24), TinyNet(16, num_classes=ck.DEMO_CLASSES)
    code, summary, _ = run_main(TINY + ["--out-dir", str(tmp_path / "own")], teacher=teacher, student=student)
    args = json.load(open(tmp_path / "own" / "args.json"))
    assert code == 0 and args["student"] == "TinyNet" and summary["acc_teacher_custom_last"] is not None
    saved = torch.load(tmp_path / "own" / "student.pt", weights_only=True)
    assert saved["model"] == "TinyNet" and torch.equal(saved["state_dict"]["fc.weight"], student.fc.weight.cpu())


# ------------------------------------------------------------------ the CIFAR ResNet teacher of docs/


# ------------------------------------------------------------------ folders of images
def write_folder(root, classes, n, seed, size=(48, 40)):
    g = gen(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour = torch.tensor([255 * (c % 2), 120, 255 * (1 - c % 2)]) + torch.randint(-20, 21, (3,), generator=g)
            img = colour.clamp(0, 255).to(torch.uint8).view(1, 1, 3).expand(size[1], size[0], 3).clone()
            img[::3] = torch.randint(0, 256, img[::3].shape, generator=g, dtype=torch.uint8)  # texture, not flat
            Image.fromarray(img.numpy()).save(root / name / f"{i}.png")


def reference_decode(path, size):
    with Image.open(path) as im:
        return TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), size), size))


def load_folder(root, args):
    """A folder listed and decoded as a run does it -> uint8 images, labels, classes, names under root."""
    files, y, classes = ck.list_folder("--train-dir", str(root))
    x, bad = ck.decode(args.image_size, files)
    ck.refuse_unreadable(bad, args)
    return x, torch.tensor(y), classes, [os.path.relpath(f, str(root)) for f in files]


def folder_args(tmp_path, *extra):
    return [
        "--dataset",
        "folder",
        "--image-size",
        "32",
        *SMALL_MODELS,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--mu",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def src_args(tmp_path):
    """The parsed flags of a run on the folder tmp/src (training and test: only the decoding is exercised)."""
    src = str(tmp_path / "src")
    return ck.parse_args(folder_args(tmp_path, "--train-dir", src, "--test-dir", src, "--out-dir", str(tmp_path / "r")))


def test_folder_is_decoded_into_memory_as_pil_and_torchvision_would(tmp_path):
    write_folder(tmp_path / "src", ["cat", "dog"], 6, 0)
    state = torch.get_rng_state()
    x, y, classes, names = load_folder(tmp_path / "src", src_args(tmp_path))
    assert torch.equal(torch.get_rng_state(), state)  # decoding leaves the seeded generator alone
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and classes == ["cat", "dog"]
    assert y.tolist() == [0] * 6 + [1] * 6 and names[7] == os.path.join("dog", "1.png")
    for i in (0, 7, 11):
        assert torch.equal(x[i], reference_decode(tmp_path / "src" / names[i], 32))
    assert x.untyped_storage().filename is None and not (tmp_path / "cache").exists()  # in memory, no file


def test_corrupt_images_are_one_line_naming_them(tmp_path, capsys):
    write_folder(tmp_path / "src", ["cat", "dog"], 3, 0)
    (tmp_path / "src" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "src" / "cat" / "empty.png").write_bytes(b"")
    write_folder(tmp_path / "test", ["cat", "dog"], 2, 1)
    argv = folder_args(tmp_path, "--train-dir", str(tmp_path / "src"), "--test-dir", str(tmp_path / "test"))
    code, _, err = run_main(argv + ["--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "2 image file(s) cannot be read" in err and "empty.png" in err and "broken.jpg" in err
    assert [f for f in os.listdir(tmp_path / "cache") if f.endswith(".u8")] == []
    listed = (tmp_path / "cache" / "unreadable.txt").read_text().splitlines()  # every one, also when many
    assert len(listed) == 2 and str(tmp_path / "cache" / "unreadable.txt") in err
    for i in range(5):
        (tmp_path / "src" / "cat" / f"bad{i}.jpg").write_bytes(b"")
    code, _, err = run_main(argv + ["--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "7 image file(s) cannot be read" in err and ", ..." in err and err.count(".jpg") < 7
    assert len((tmp_path / "cache" / "unreadable.txt").read_text().splitlines()) == 7


def test_grayscale_palette_rgba_and_cmyk_images_are_converted(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    base = Image.fromarray(torch.randint(0, 256, (40, 36, 3), generator=gen(), dtype=torch.uint8).numpy())
    for mode, ext in (("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("LA", "png"), ("1", "bmp")):
        base.convert(mode).save(tmp_path / "src" / "a" / f"{mode}.{ext}")
    args = src_args(tmp_path)
    x, _, _, names = load_folder(tmp_path / "src", args)
    assert len(x) == 6
    for i, name in enumerate(names):
        assert torch.equal(x[i], reference_decode(tmp_path / "src" / name, 32)), name
    assert x[names.index(os.path.join("a", "L.png"))].float().std(0).max() == 0  # grey: the channels agree


def test_folder_class_mismatch_is_a_clear_error(tmp_path, capsys):
    write_folder(tmp_path / "a", ["cat", "dog"], 2, 0)
    write_folder(tmp_path / "b", ["cat", "bird"], 2, 0)
    code, _, err = run_main(
        folder_args(
            tmp_path,
            "--train-dir",
            str(tmp_path / "a"),
            "--test-dir",
            str(tmp_path / "b"),
            "--out-dir",
            str(tmp_path / "r"),
        ),
        capsys,
    )
    assert code == 2 and "'bird'" in err and "'dog'" in err and "--test-dir" in err


# ------------------------------------------------------------------ several processes (torchrun, gloo on the CPU)
WORKER = """
import os, sys, torch, timm
import customkd as ck
torch.manual_seed(0)  # a BatchNorm-free student: 2 processes must then match 1 process up to float rounding
student = timm.create_model('vit_tiny_patch16_224', depth=1, patch_size=8, img_size=32, num_classes=40)
seen = []  # images through the student in this process
student.patch_embed.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
ck.main(sys.argv[1:], student=student)
torch.save({'state': student.state_dict(), 'images': sum(seen)},
           os.path.join(os.environ['OUT'], 'rank%s.pt' % os.environ.get('RANK', '0')))
"""
DDP_ARGS = [
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "256",
    "--labels",
    "40",
    "--epochs",
    "2",
    "--demo-teacher-steps",
    "0",
    "--cka-samples",
    "40",
    "--lr",
    "0.05",
    "--custom-steps",  # one pass: with 50 stage-1 steps an epoch the runs' float rounding grew past the bound below
    "0",
]


def torchrun(n, *argv, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *argv],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_two_processes_train_like_one(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
    cache = ["--teacher-cache"]  # the teacher's features: all by one process, half by each of two
    ref = subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), *DDP_ARGS, *cache, "--out-dir", str(one / "run")],
        cwd=HERE,
        env=dict(ENV, OUT=str(one)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr
    argv = [str(tmp_path / "worker.py"), *DDP_ARGS, *cache, "--out-dir", str(two / "run")]
    proc = torchrun(2, *argv, env=dict(ENV, OUT=str(two)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len([line for line in out.splitlines() if line.startswith("epoch")]) == 2  # rank 0 alone prints
    assert (
        sorted(os.listdir(two / "run"))
        == ["args.json", "checkpoint.pt", "features.pt", "metrics.jsonl", "student.pt", "summary.json"]
        and len(rows(two / "run")) == 2
    )
    assert json.load(open(two / "run" / "summary.json"))["world_size"] == 2
    r0, r1, r = (torch.load(p, weights_only=True) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    # each process did its half of every batch, the whole test set (2 epochs x 256 images: every process evaluates
    # all of it, so that the numbers are the same at any process count) and its own dummy forward
    assert r0["images"] == r1["images"] and 2 * r0["images"] - r["images"] == 2 * 256 + 1
    r0, r1, r = r0["state"], r1["state"], r["state"]
    init = timm.create_model(
        "vit_tiny_patch16_224", depth=1, patch_size=8, img_size=32, num_classes=ck.DEMO_CLASSES
    ).state_dict()
    for k in r:
        assert torch.equal(r0[k], r1[k]), k  # DDP kept the ranks identical
        moved = (r[k] - init[k]).abs().max().item()
        # Each rank trained on its own half of every batch and the gradients were averaged: one process's result up
        # to float rounding. Ranks that both used the same half, or summed gradients, move far more than this.
        assert (r0[k] - r[k]).abs().max().item() <= 1e-3 * max(moved, 1e-3), k
    assert sum((r[k] - init[k]).abs().max().item() for k in r) > 0.1  # and training did move the parameters
    row1, row2 = rows(one / "run"), rows(two / "run")
    assert row1[-1]["loss/sup"] == pytest.approx(row2[-1]["loss/sup"], rel=1e-3)
    assert abs(row1[-1]["acc/student"] - row2[-1]["acc/student"]) <= 1 / 64  # a near-tie may flip one test image


def child_pids(pid):
    found = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(p))
        except OSError:
            pass
    return found


def test_a_killed_process_ends_every_process_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    cache = ["--teacher-cache"]  # built in shards and gathered
    argv = [os.path.join(HERE, "customkd.py"), *DDP_ARGS, *cache, "--epochs", "200", "--out-dir", str(run_dir)]
    proc = torchrun(2, *argv, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.2)
    workers = child_pids(proc.pid)
    rank1 = [p for p in workers if b"RANK=1\x00" in open(f"/proc/{p}/environ", "rb").read()]
    assert len(workers) == 2 and len(rank1) == 1
    t = time.time()
    os.kill(rank1[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - t < 30  # no hang
    ours = [line for line in err.splitlines() if line.startswith("customkd: error:")]
    assert len(ours) == 1 and "[rank 0]" in ours[0] and "Traceback" not in "\n".join(ours)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] >= 1  # the last checkpoint is intact


# ------------------------------------------------------------------ bad input
BAD = [
    (["--labels", "ten"], "'ten'"),
    (["--labels", "0"], "a count or"),
    (["--labels", "0pct"], "percentage"),
    (["--labels", "150pct"], "percentage"),
    (["--labels", "-5"], "'-5'"),
    (["--labels", "15"], "divide evenly"),
    (["--labels", "400"], "class 0 has 5 images"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--student", "no_such_net"], "unknown timm model"),
    (["--teacher", "no_such_vit"], "unknown timm model"),
    (["--device", "cuda"], "no CUDA device"),
    (["--epochs", "0"], "--epochs: expected a whole number in [1, "),
    (["--batch-size", "-4"], "got '-4'"),
    (["--lr", "0"], "--lr: expected a number in (0, 10]"),
    (["--lr-custom", "nan"], "got 'nan'"),
    (["--w-sup", "inf"], "--w-sup: expected a number in [0, 1000], got 'inf'"),
    (["--teacher-kwargs", "[1]"], "JSON object"),
    (["--dataset", "folder"], "--train-dir"),
    (["--student-kwargs", '{"no_such_arg": 1}'], "unexpected keyword argument 'no_such_arg'"),
    (["--teacher-res", "8", "--teacher-kwargs", '{"patch_size": 16}'], "--teacher cannot take --teacher-res 8"),
    (["--train-dir", "/nonexistent"], "only for --dataset folder"),
    (["--resume", "--overwrite"], "not allowed with argument --resume"),
    (["--teacher-weights", "/nonexistent.pth"], "is not an existing file"),
    (["--teacher-kwargs", '{"num_classes": 5}'], "multiple values for keyword argument 'num_classes'"),
    (["--student-kwargs", '{"img_size": 64}'], "unexpected keyword argument 'img_size'"),
    (["--student-kwargs", '{"pretrained": true}'], "multiple values for keyword argument 'pretrained'"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(TINY + argv + ["--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("customkd: error:")
    assert not (tmp_path / "r").exists()


def test_out_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub", "/proc/customkd-run"):  # a file, under a file, in /proc
        code, summary, err = run_main(TINY + ["--out-dir", str(out)], capsys)
        assert code == 2 and summary is None and f"--out-dir {str(out)!r} cannot be made or written to (" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["f"]
    if os.geteuid() != 0:  # a folder that exists but cannot be written (root writes anyway)
        os.chmod(tmp_path, 0o555)
        try:
            code, _, err = run_main(TINY + ["--out-dir", str(tmp_path), "--overwrite"], capsys)
        finally:
            os.chmod(tmp_path, 0o755)
        assert code == 2 and "cannot be made or written to (Permission denied)" in err


def test_cache_dir_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cache = tmp_path / "f" / "cache"  # below a file: the demo's models cannot be kept there
    argv = TINY + ["--epochs", "1", "--demo-teacher-steps", "2", "--cache-dir", str(cache)]
    code, _, err = run_main(argv + ["--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write {cache}/demo-teacher-" in err and "(Not a directory); any earlier demo-teacher-" in err
    assert not (tmp_path / "r").exists() and (tmp_path / "f").read_text() == "x"


SWEEP = ["0", "1", "-1", "nan", "inf", "1e30", "", "MISSING", "FILE", "DIR"]


def test_every_flag_through_edge_values_exits_cleanly(tmp_path, monkeypatch, capsys):
    """Every flag of the parser (so that a new one cannot escape) through edge values: exit 0, 2 or 3, one line on
    error, never a traceback. Values that pass validation run one short epoch, unless they parse to the arguments of
    a run already made (`--seed 0` is the base run again): those are parsed only."""
    monkeypatch.chdir(tmp_path)  # relative --out-dir values such as '1' land here
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # tracing is the --compile test's job
    (tmp_path / "FILE").write_text("not an image, a list or weights\n")
    (tmp_path / "DIR").mkdir()
    base = [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "40",
        "--labels",
        "40",
        "--epochs",
        "1",
        "--cka-samples",
        "10",
        "--demo-teacher-steps",
        "0",
    ]
    flags = [a for a in ck.build_parser()._actions if a.option_strings and a.dest != "help"]
    seen, ran, n = set(), set(), 0  # options tried, distinct parsed arguments run, invocations
    for action in flags:
        for option in action.option_strings:
            for value in [None] if action.nargs == 0 else SWEEP:
                value = str(tmp_path / "no" / "such") if value == "MISSING" else value
                argv = (
                    base
                    + ["--out-dir", str(tmp_path / "runs" / str(n))]
                    + [option]
                    + ([] if value is None else [value])
                )
                try:
                    parsed = vars(ck.parse_args(argv))
                    key = repr(sorted((k, v) for k, v in parsed.items() if k != "out_dir" or option == "--out-dir"))
                except (SystemExit, ck.Abort):
                    key = None
                capsys.readouterr()
                seen.add(option)
                n += 1
                if key is not None and key in ran:  # refused values always run: their error line is checked
                    continue
                ran.add(key)
                code, _, err = run_main(argv, capsys)
                out = capsys.readouterr()
                assert code in (0, 2, 3), (argv, code, err)
                assert "Traceback" not in err + out.out + out.err, argv
                assert code == 0 or (len(err.strip().splitlines()) == 1 and err.startswith("customkd: error:")), argv
    assert len(seen) == len([o for a in flags for o in a.option_strings]) >= 44 and n > 300 and len(ran) > 50


# ------------------------------------------------------------------ unexpected errors
@pytest.mark.parametrize(
    "where,caller", [("distill_step", "distill_epoch"), ("loss_customize", "customize_epoch"), ("evaluate", "run")]
)
def test_a_bug_inside_a_stage_shows_its_traceback_then_one_line(tmp_path, capsys, monkeypatch, where, caller):
    def broken(*a, **k):
        raise RuntimeError("shapes (4, 8) and (7, 8) do not match")

    monkeypatch.setattr(ck, where, broken)
    code, _, err = run_main(TINY + ["--out-dir", str(tmp_path / "r")], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[0] == "Traceback (most recent call last):"
    assert f", in {caller}\n" in err and ", in broken\n" in err  # the frames that lead to the bug
    assert lines[-2] == "RuntimeError: shapes (4, 8) and (7, 8) do not match"
    assert lines[-1].startswith("customkd: error: unexpected RuntimeError (traceback above): a bug")
    assert "lower --batch-size" in lines[-1] and err.count("customkd: error:") == 1


def test_cli_errors_print_no_traceback(monkeypatch, capsys):
    """`python customkd.py` with a bad flag, its `__main__` lines run here (a new interpreter would add 7 s of imports;
    the SIGTERM test runs one): exit 2, one line. The in-process flag sweep covers the rest."""
    argv = [os.path.join(HERE, "customkd.py"), "--dataset", "synthetic", "--image-size", "-3"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(argv[0], run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.startswith("customkd: error: argument --image-size")
    assert len(err.strip().splitlines()) == 1


def test_misspelled_flag_is_one_line(tmp_path, capsys):
    code, _, err = run_main(TINY + ["--train_dir", str(tmp_path), "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "customkd: error: unrecognized arguments: --train_dir" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_help_lists_every_flag_with_help_text():
    parser = ck.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 40 and all(a.help for a in flags)


# ------------------------------------------------------------------ run directories and checkpoints
def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_main(TINY + ["--epochs", "1", "--out-dir", str(out)])[0] == 0
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_bytes()
    code, _, err = run_main(TINY + ["--epochs", "1", "--out-dir", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err and (out / "metrics.jsonl").read_bytes() == before
    with pytest.MonkeyPatch.context() as mp:  # an --overwrite run stopped in its first epoch: nothing old survives
        mp.setattr(ck, "customize_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        assert run_main(TINY + ["--epochs", "1", "--overwrite", "--out-dir", str(out)])[0] == 130
    assert sorted(os.listdir(out)) == ["args.json", "metrics.jsonl"] and (out / "metrics.jsonl").read_text() == ""
    assert run_main(TINY + ["--epochs", "1", "--overwrite", "--out-dir", str(out)])[0] == 0
    assert sorted(os.listdir(out)) == RUN_FILES


def test_resume_refuses_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_main(TINY + ["--resume", "--out-dir", str(out)], capsys)
    assert code == 2 and "no readable CustomKD checkpoint" in err and "FileNotFoundError" in err
    assert run_main(TINY + ["--epochs", "1", "--out-dir", str(out)])[0] == 0
    capsys.readouterr()
    for argv, said in (
        (["--labels", "80"], "--labels 40"),
        (["--split-seed", "3"], "--split-seed 0"),
        (["--student", "mobilenetv3_small_075"], "--student mobilenetv3_small_050"),
        (["--teacher", "vit_small_patch16_224"], "--teacher vit_tiny_patch16_224"),
        (["--demo-teacher-steps", "5"], "--demo-teacher-steps 0"),
    ):
        code, _, err = run_main(TINY + argv + ["--resume", "--out-dir", str(out)], capsys)
        assert code == 2 and said in err, argv
    code, _, err = run_main(["--dataset", "cifar10", "--resume", "--out-dir", str(out)], capsys)
    assert code == 2 and "--dataset synthetic" in err
    good = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    code, _, err = run_main(TINY + ["--resume", "--out-dir", str(out)], capsys)
    assert code == 2 and "no readable CustomKD checkpoint" in err
    torch.save({"identity": {}, "payload": TinyNet(2)}, out / "checkpoint.pt")  # pickled code: must not be loaded
    code, _, err = run_main(TINY + ["--resume", "--out-dir", str(out)], capsys)
    assert code == 2 and "no readable CustomKD checkpoint" in err
    torch.save({"epoch": 1}, out / "checkpoint.pt")  # readable, but not a CustomKD checkpoint
    code, _, err = run_main(TINY + ["--resume", "--out-dir", str(out)], capsys)
    assert code == 2 and "no readable CustomKD checkpoint" in err and "a file of another kind" in err


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ck.save_atomic({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_non_finite_loss_stops_and_says_what_is_kept(tmp_path, capsys, monkeypatch, bad_epoch):
    real, epochs_done = ck.loss_entropy, []
    monkeypatch.setattr(ck, "loss_entropy", lambda z: real(z) * (math.nan if len(epochs_done) + 1 >= bad_epoch else 1))
    real_line = ck.console_line
    monkeypatch.setattr(ck, "console_line", lambda row, n: epochs_done.append(row["epoch"]) or real_line(row, n))
    code, _, err = run_main(TINY + ["--epochs", "3", "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 3 and f"loss/entropy became non-finite in epoch {bad_epoch}" in err
    if bad_epoch == 1:
        assert "no checkpoint was written" in err and not (tmp_path / "r" / "checkpoint.pt").exists()
    else:
        assert "checkpoint of epoch 1" in err and "--resume" in err
        assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("stop_epoch", [0, 1])
def test_interruption_says_whether_there_is_a_checkpoint_to_resume(tmp_path, capsys, monkeypatch, stop_epoch):
    real = ck.customize_epoch

    def interrupted(kd, epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM during this epoch's stage 1
        return real(kd, epoch)

    monkeypatch.setattr(ck, "customize_epoch", interrupted)
    out = tmp_path / "r"
    code, _, err = run_main(TINY + ["--out-dir", str(out)], capsys)
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err
    if stop_epoch == 0:
        assert "no checkpoint: start again (with --overwrite" in err and not (out / "checkpoint.pt").exists()
        monkeypatch.setattr(ck, "customize_epoch", real)
        assert run_main(TINY + ["--out-dir", str(out), "--overwrite"])[0] == 0
    else:
        assert "checkpoint.pt is intact: add --resume" in err and len(rows(out)) == 1


DET = TINY + ["--epochs", "3", "--deterministic"]


def test_stop_and_resume_is_exact(tmp_path, monkeypatch):
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert run_main(DET + ["--out-dir", str(ref)])[0] == 0
    real_line = ck.console_line

    def stop_after_first(row, n):
        if row["epoch"] == 1:
            raise KeyboardInterrupt
        return real_line(row, n)

    monkeypatch.setattr(ck, "console_line", stop_after_first)
    assert run_main(DET + ["--out-dir", str(part)])[0] == 130
    monkeypatch.setattr(ck, "console_line", real_line)
    assert len(rows(part)) == 1
    assert run_main(DET + ["--out-dir", str(part), "--resume"])[0] == 0
    assert rows(part) == rows(ref) and len(rows(ref)) == 3
    assert (part / "student.pt").read_bytes() == (ref / "student.pt").read_bytes()


def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path):
    ref, part = tmp_path / "ref", tmp_path / "part"
    argv = DET + ["--synthetic-size", "400", "--epochs", "4"]
    assert run_main(argv + ["--out-dir", str(ref)])[0] == 0
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "customkd.py"), *argv, "--out-dir", str(part)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    metrics, deadline = part / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    done = torch.load(part / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4 and len(rows(part)) == done
    assert run_main(argv + ["--out-dir", str(part), "--resume"])[0] == 0
    assert rows(part) == rows(ref)
    assert (part / "student.pt").read_bytes() == (ref / "student.pt").read_bytes()


# ------------------------------------------------------------------ a newcomer's mistakes and damaged storage
def test_test_folder_that_is_or_shares_the_training_folder_is_refused_before_decoding(tmp_path, capsys):
    root = tmp_path / "data"  # the parent of train/ and test/, given as both folders: a 2-class 'train vs test' task
    write_folder(root / "train", ["cat", "dog"], 3, 0)
    write_folder(root / "test", ["cat", "dog"], 2, 1)
    code, _, err = run_main(
        folder_args(tmp_path, "--train-dir", str(root), "--test-dir", str(root), "--out-dir", str(tmp_path / "r")),
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds 10 of the --train-dir images" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r").exists()  # nothing decoded, nothing written
    code, _, err = run_main(
        folder_args(
            tmp_path, "--train-dir", str(root), "--test-dir", str(root / "test"), "--out-dir", str(tmp_path / "r")
        ),
        capsys,
    )  # only --train-dir at the parent
    assert code == 2 and "class folders differ" in err and "'test', 'train'" in err  # the names tell
    assert not (tmp_path / "cache").exists()  # listed and checked before anything is decoded
    other = tmp_path / "other"  # a test folder with one training image in it (here, a link to it)
    write_folder(other, ["cat", "dog"], 2, 2)
    os.symlink(root / "train" / "dog" / "1.png", other / "dog" / "copy.png")
    code, _, err = run_main(
        folder_args(
            tmp_path, "--train-dir", str(root / "train"), "--test-dir", str(other), "--out-dir", str(tmp_path / "r")
        ),
        capsys,
    )
    assert code == 2 and "holds 1 of the --train-dir images" in err and "copy.png" in err and "parent" not in err


class DiskFull:
    """A file whose write stores half of the bytes, then raises ENOSPC, as on a full disk."""

    def __init__(self, path, mode):
        self.f = open(path, mode)

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_out_of_space_while_saving_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    saved = []

    def fake_open(path, mode="r", *a, **k):  # checkpoints of epoch 1 are written, then the disk is full
        if str(path).endswith("checkpoint.pt.tmp"):
            saved.append(path)
        return DiskFull(path, mode) if len(saved) >= 2 else open(path, mode, *a, **k)

    monkeypatch.setattr(ck, "open", fake_open, raising=False)
    out = tmp_path / "r"
    code, _, err = run_main(TINY + ["--epochs", "3", "--out-dir", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write {out / 'checkpoint.pt'} (No space left on device); any earlier checkpoint.pt is intact" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the last good one, whole
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and len(rows(out)) == 1
    monkeypatch.setattr(ck, "open", open, raising=False)
    assert run_main(TINY + ["--epochs", "3", "--out-dir", str(out), "--resume"])[0] == 0 and len(rows(out)) == 3


def test_resume_compares_model_arguments_as_json_not_as_text(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        run_main(TINY + ["--epochs", "1", "--teacher-kwargs", '{"depth":1,"patch_size":8}', "--out-dir", str(out)])[0]
        == 0
    )
    code, _, _ = run_main(
        TINY
        + ["--epochs", "2", "--teacher-kwargs", '{ "patch_size": 8,  "depth": 1 }', "--resume", "--out-dir", str(out)],
        capsys,
    )
    assert code == 0 and len(rows(out)) == 2
    code, _, err = run_main(
        TINY
        + ["--epochs", "3", "--teacher-kwargs", '{"depth": 2, "patch_size": 8}', "--resume", "--out-dir", str(out)],
        capsys,
    )
    assert code == 2 and "'depth': 1" in err and "not {'depth': 2, 'patch_size': 8}" in err


def test_own_model_without_forward_head_names_the_missing_method(tmp_path, capsys):
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    teacher.forward_features = teacher.forward  # forward_head is missing
    code, _, err = run_main(TINY + ["--out-dir", str(tmp_path / "r")], capsys, teacher=teacher)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--teacher Sequential has no forward_head: a teacher needs forward_features, forward_head" in err
    assert "teacher-res" not in err
    code, _, err = run_main(TINY + ["--out-dir", str(tmp_path / "r")], capsys, student=TinyNet(16))
    assert code == 2 and "the student head must output 40 classes" in err


# ------------------------------------------------------------------ docs: links, scripts, export
def slugs(page):
    """GitHub's anchors of a Markdown page's headings."""
    text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_link_in_the_readme_and_docs_points_at_something_that_exists():
    pages = ["README.md"] + [
        os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(HERE, "docs"))) if f.endswith(".md")
    ]
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", open(os.path.join(HERE, page)).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            full = (
                os.path.normpath(os.path.join(HERE, os.path.dirname(page), path)) if path else os.path.join(HERE, page)
            )
            assert os.path.exists(full), (page, target)
            assert not anchor or anchor in slugs(full), (page, target)
            checked += 1
    assert checked >= 20
    readme = open(os.path.join(HERE, "README.md")).read()
    command = "HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py tools/test_tools.py"
    assert len(readme.splitlines()) <= 300 and command in readme
    assert open(os.path.join(HERE, ".ci", "run")).read().strip().splitlines()[-1] == command
