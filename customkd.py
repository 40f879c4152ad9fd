"""CustomKD in one file: customize a frozen vision foundation model to an edge student, then distil.

Paper: J. Lee, D. Das, M. Hayat, S. Choi, K. Hwang, F. Porikli, "CustomKD: Customizing Large Vision Foundation for
Edge Model Improvement via Knowledge Distillation", CVPR 2025, arXiv:2503.18244.

  python customkd.py --dataset cifar100 --labels 10pct     # the main job (GPU + internet)
  python customkd.py --dataset synthetic                   # the offline CPU demo
  HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py tools/test_tools.py   # the tests (CPU, no network)
  python tools/large.py --dataset folder ...   # the paper's large settings: this file, extended through its hooks

Measured (torch 2.14.1, timm 1.0.31, a 2-core AMD EPYC with AVX-512, no GPU; last-epoch accuracy, seed means): CustomKD
with L_f~t in the head's row space (default) / over all of f_s (the paper's wording) / L_ft only: the demo (seeds 0-4)
0.820 / 0.691 / 0.704; real photos (docs/real-photos.md: CIFAR-10, a CIFAR-100 ResNet-56 teacher; seeds 0-4), 1 % labels
0.476 / 0.448 / 0.443, 4 per class 0.358 / 0.295 / 0.298. Spreads, wall times, other rows: docs/. GPU: not yet measured.
"""

import argparse
import hashlib
import json
import math
import os
import re
import resource
import signal
import socket
import sys
import time
import traceback
from functools import partial
from types import SimpleNamespace

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image


# ================================================================ 1. the method: all of CustomKD (paper Sec. 3, Fig. 2)
# All of CustomKD, top-down as in the paper's Fig. 2; it reads alone, and the lines that *are* the method are tagged
# `# [CustomKD]`. `kd` holds the run (section 2); sections 2-7 are reference material. Helpers from them: seeded batch
# plans, crops, flips (epoch_plan, augment; 4), f_t (teacher_features; 5), processes (shard, ...; 6), logs (7).
def run(args, teacher=None, student=None, **hooks):
    """The paper's loop: every epoch customizes the teacher to the student (stage 1), then distils it (stage 2)."""
    kd = setup(args, teacher, student, **hooks)  # models, projectors, data, optimizers, the state kd: section 2
    for epoch in range(len(kd.history), args.epochs):  # with --resume, from the checkpoint's epoch
        row = dict.fromkeys(METRIC_KEYS) | {"epoch": epoch + 1}  # this epoch's line of metrics.jsonl
        if kd.proj_custom is not None and epoch % args.custom_every == 0:  # [CustomKD] alternate 1:1 (paper)
            row.update(customize_epoch(kd, epoch))  # [CustomKD] stage 1
        row.update(distill_epoch(kd, epoch))  # [CustomKD] stage 2
        row.update(evaluate(kd))
        save_epoch(kd, row)
    return summarise(kd)


def customize_epoch(kd, epoch):
    """[CustomKD] Stage 1, feature customization: trains only P_c, on D_L, for at least --custom-steps steps."""
    t0 = clock(kd.device)
    set_stage(kd, 1)
    batch = global_batch(kd.args.batch_size, len(kd.labeled_idx))
    steps = max(len(kd.labeled_idx) // batch, kd.args.custom_steps)  # >=50 steps, D_L cycled; 0: a pass (the paper)
    log = []
    for p in epoch_plan(kd.labeled_idx, batch, steps, plan_generator(kd.args.seed, epoch, 1), kd.pad):
        p = shard(p)  # this process's share of the batch
        f_t = teacher_features(kd, p)  # (B, d_t), T frozen; the planned crop and flip (--teacher-cache: the flip)
        with kd.amp():
            logits = kd.customizer(f_t)  # [CustomKD] (B, C) = h(P_c(f_t)): P_c, then the student's frozen head h
        loss = loss_customize(logits, fetch(kd.y_pool, p[:, 0], kd.device))  # [CustomKD] L_cust
        take_step(kd.opt_custom, loss)  # opt_custom holds P_c's weights alone
        log.append({"loss/customize": loss.detach()})
    return epoch_means(kd, epoch, log) | timings("customize", t0, steps * batch, kd.device)


def distill_epoch(kd, epoch):
    """[CustomKD] Stage 2, distillation: one pass over D_U; each step also takes a batch of D_L (cycled)."""
    t0 = clock(kd.device)
    set_stage(kd, 2)
    a = kd.args
    batch_l = global_batch(a.batch_size, len(kd.labeled_idx))
    batch_u = global_batch(a.mu * a.batch_size, len(kd.unlabeled_idx))
    steps = len(kd.unlabeled_idx) // batch_u
    gen = plan_generator(a.seed, epoch, 2)
    plans_l = epoch_plan(kd.labeled_idx, batch_l, steps, gen, kd.pad)  # (steps, batch_l, 4): D_L, cycled
    plans_u = epoch_plan(kd.unlabeled_idx, batch_u, steps, gen, kd.pad)  # (steps, batch_u, 4): one pass over D_U
    log = []
    for step in range(steps):
        for group in kd.opt.param_groups:  # cosine decay over all stage-2 steps of the run, no warm-up
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (a.epochs * steps)))
        plan_l = shard(plans_l[step])
        plan = torch.cat([plan_l, shard(plans_u[step])])  # this process's share of [x_l; x_u]
        x = augment(kd.x_pool, plan, kd.device)  # the student's view: each image cropped and flipped as planned
        f_t = None
        if kd.teacher is not None:  # the same view x; with --teacher-cache, the planned flip of the whole image
            f_t = teacher_features(kd, plan, x)  # (B, d_t), no gradient
        terms = distill_step(kd, x, fetch(kd.y_pool, plan_l[:, 0], kd.device), f_t)
        loss = (  # [CustomKD] the paper's weighted sum (a term whose weight is 0 is not computed)
            a.w_sup * terms["loss/sup"]
            + a.w_ent * terms["loss/entropy"]
            + a.w_custom * terms.get("loss/feat_custom", 0)
            + a.w_general * terms.get("loss/feat_general", 0)
        )
        take_step(kd.opt, loss)
        log.append({k: v.detach() for k, v in terms.items()})
    average_buffers(kd.student)  # several processes: BatchNorm statistics (section 6)
    return epoch_means(kd, epoch, log) | timings("distill", t0, steps * (batch_l + batch_u), kd.device)


def distill_step(kd, x, y_l, f_t):
    """[CustomKD] The stage-2 terms on one batch x = [x_l; x_u]. Returns {log key: term}."""
    with kd.amp():
        f_s, logits, f_s_projected = kd.student_side(kd.view_s(x))  # (B, d_s), (B, C), (B, d_t) or None
        if kd.proj_custom is not None:
            with torch.no_grad():
                f_t_custom = kd.proj_custom(f_t)  # (B, d_s): f~_t, P_c frozen in stage 2
    terms = {  # the losses in float32, outside autocast
        "loss/sup": loss_sup(logits[: len(y_l)], y_l),  # [CustomKD] L_L on D_L
        "loss/entropy": loss_entropy(logits[len(y_l) :]),  # [CustomKD] L_U on D_U
    }
    if kd.proj_custom is not None:  # in the row space of the head stage 1 read through, or over all d_s
        head_weight = kd.head_c.weight if kd.args.custom_space == "head" else None
        terms["loss/feat_custom"] = loss_feat_custom(f_s, f_t_custom, head_weight)  # [CustomKD] L_f~t
    if f_s_projected is not None:
        terms["loss/feat_general"] = loss_feat_general(f_s_projected, f_t)  # [CustomKD] L_ft
    return terms


def loss_customize(logits, y):
    """Stage 1, L_cust = CE(h(P_c(f_t)), y): the frozen student head reads the customized teacher feature."""
    return F.cross_entropy(logits.float(), y, reduction="mean")


def loss_feat_custom(f_s, f_t_custom, head_weight=None):
    """L_f~t = mean_(b,c) (((f_s - sg(f~_t)) Q)_bc)^2, Q (d_s, C) an orthonormal basis of the row space of the head's
    weight (C, d_s): stage 1 reads f~_t only through that head, so only this part of f~_t was customized; the other
    d_s - C directions are P_c's initialisation. head_weight None: MSE(f_s, sg(f~_t)) over all d_s (paper's wording)."""
    if head_weight is None:
        return F.mse_loss(f_s.float(), f_t_custom.detach().float(), reduction="mean")
    q = torch.linalg.qr(head_weight.detach().float().T)[0]  # (d_s, C), from the head's current weight
    return ((f_s.float() - f_t_custom.detach().float()) @ q).pow(2).mean()


def loss_feat_general(f_s_projected, f_t):
    """L_ft = MSE(P_g(f_s), sg(f_t)): imitate the original, task-general teacher feature."""
    return F.mse_loss(f_s_projected.float(), f_t.detach().float(), reduction="mean")


def loss_sup(logits_l, y_l):
    """L_L = CE(h(f_s_l), y_l) on the labeled images."""
    return F.cross_entropy(logits_l.float(), y_l, reduction="mean")


def loss_entropy(logits_u):
    """L_U = mean_b H(softmax(h(f_s_u))), H(p) = -sum_c p_c log p_c, on the unlabeled images."""
    logp = logits_u.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


@torch.no_grad()
def evaluate(kd):
    """Test accuracy of the student and of h(P_c(f_t)); linear CKA of f_s with f~_t and f_t on fixed test rows."""
    t0 = clock(kd.device)
    kd.student.eval()
    f_s = []  # every process evaluates every test image: the same numbers at any process count
    for i in range(0, len(kd.x_test), kd.batch_eval):
        with kd.amp():
            f_s.append(kd.student_side(kd.view_s(kd.x_test[i : i + kd.batch_eval].to(kd.device).float()))[0].float())
    f_s = torch.cat(f_s)  # (N, d_s)
    out = {"acc/student": (kd.head(f_s).argmax(-1) == kd.y_test).float().mean().item()}
    out["rms/f_s"] = f_s.pow(2).mean().sqrt().item()  # root-mean-square: the feature's scale
    centred = f_s - f_s.mean(0)  # the share of its centred energy in the row space of h (at random C / d_s):
    q = torch.linalg.qr(kd.head.weight.float().T)[0]  # (d_s, C), an orthonormal basis of that row space
    out["share/f_s_in_head"] = ((centred @ q).pow(2).sum() / centred.pow(2).sum()).item()
    feats = {"f_s": f_s, "y": kd.y_test}
    if kd.teacher is not None:
        feats["f_t"] = kd.cache_test.float().to(kd.device)  # (N, d_t), computed once: T is frozen
    if kd.proj_custom is not None:
        feats["f_t_custom"] = f_t_custom = kd.proj_custom(feats["f_t"])  # (N, d_s)
        out["acc/teacher_custom"] = (kd.head_c(f_t_custom).argmax(-1) == kd.y_test).float().mean().item()
        out["rms/f_t_custom"] = f_t_custom.pow(2).mean().sqrt().item()  # the target's scale
    rows = torch.randperm(len(kd.x_test), generator=torch.Generator().manual_seed(0))[: kd.args.cka_samples]
    kd.sample = {k: v[rows.to(kd.device)].cpu() for k, v in feats.items()}  # the same rows each time; features.pt
    for k, name in (("f_t_custom", "custom"), ("f_t", "teacher")):
        if k in feats and len(rows) > 1:
            out[f"cka/student_vs_{name}"] = linear_cka(kd.sample["f_s"], kd.sample[k])
    return out | timings("eval", t0, len(kd.x_test), kd.device)


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred; x (n, p), y (n, q)."""
    x, y = (t.double() - t.double().mean(0) for t in (x, y))
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def make_projectors(kd, num_classes):
    """[CustomKD] The two projectors, one linear layer each (the paper: "a projection layer"); d_t, d_s measured."""
    if kd.args.w_custom > 0:  # [CustomKD] P_c: d_t -> d_s, the customization projector (paper θ_t^h)
        # P_c(f_t) is a *target for f_s*, so it ends where f_s ends (a gap the paper leaves): timm's MobileNetV3
        # pre-logits come out of `act2` (Hardswish, min -0.375) after `conv_head`; other students: identity.
        act = getattr(kd.student, "act2", None)
        end = type(act)() if hasattr(kd.student, "conv_head") and isinstance(act, nn.Module) else nn.Identity()
        kd.proj_custom = nn.Sequential(nn.Linear(kd.d_t, kd.d_s), end).to(kd.device)
        kd.head_c = kd.head
        if kd.args.custom_head == "random":  # the paper's ablation: customize through a random frozen head
            kd.head_c = nn.Linear(kd.d_s, num_classes).to(kd.device).requires_grad_(False)
    if kd.args.w_general > 0:  # [CustomKD] P_g: d_s -> d_t, the general projector on the student side
        kd.proj_general = nn.Linear(kd.d_s, kd.d_t).to(kd.device)


def set_stage(kd, stage):
    """Frozen means frozen: stage 1 may change only P_c; stage 2 only the student (with h) and P_g; T never."""
    trainable = [(kd.teacher, False), (kd.proj_custom, stage == 1), (kd.student, stage == 2)]
    for module, on in trainable + [(kd.proj_general, stage == 2)]:
        if module is not None:
            module.requires_grad_(on).train(on)  # the teacher: no gradients, eval mode, always


def take_step(opt, loss):
    """One optimizer step on `loss` (SGD for the student side, Adam for P_c); under DDP, averaged gradients."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ================================================================ 2. setting a run up: the state `kd` holds
def setup(args, teacher=None, student=None, data=None, keep_features=None):
    """Everything before the first epoch: processes, data, models, projectors, split, optimizers, run folder, cache.
    Hooks: data(args) -> the data a run is given (default load_data); keep_features(kd, make) -> the teacher's
    features, {cache_train, cache_test} = make() by default (tools/large.py keeps them on disk for later runs)."""
    device = init_process(args)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")  # auto: on CUDA only
    kd = SimpleNamespace(  # everything one run holds, each field once (`kd` in every function); build() adds the models
        args=args,  # the checked flags (section 3)
        device=device,  # cpu, or cuda:LOCAL_RANK
        bf16=bf16,
        amp=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16),  # kd.amp(): bf16 or nothing
        teacher=None,  # T, frozen; None when both feature weights are 0
        proj_custom=None,  # P_c: d_t -> d_s (then S's last activation); None if w_custom = 0
        proj_general=None,  # P_g: d_s -> d_t; None if w_general = 0
        head_c=None,  # the head stage 1 reads P_c(f_t) through: h, or a random frozen one
        opt_custom=None,  # stage 1: Adam over P_c alone
        cache_train=None,  # --teacher-cache: f_t of each training image and its flip (2N, d_t)
        history=[],  # one metrics row per epoch run so far
        t_start=time.time(),  # start of the run, earlier sessions' wall time included
        time_cache=0.0,  # seconds spent on the teacher's features
        sample={},  # the last evaluation's f_s, f_t, f_t_custom, y on the CKA rows (features.pt)
    )
    args.teacher = type(teacher).__name__ if teacher is not None else args.teacher  # your own modules: by their class
    args.student = type(student).__name__ if student is not None else args.student
    ckpt = load_checkpoint(args) if args.resume else None
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA lacks a few kernels
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.manual_seed(args.seed)
    data = (data or load_data)(args)
    num_classes = len(data["classes"])
    build(kd, num_classes, teacher, student)
    if "labeled_idx" in data:  # given with the data (tools/large.py: --labeled-list)
        kd.labeled_idx = data["labeled_idx"]  # D_L, rows of x_pool
    else:  # class-balanced; images labeled -1 (an unlabeled domain) are never chosen
        kd.labeled_idx = split_labeled(data["train_y"], args.labels, num_classes, args.split_seed)
    # D_U: every training image, the labeled ones included (FixMatch/USB), unless the data says otherwise
    kd.unlabeled_idx = data.get("unlabeled_idx", torch.arange(len(data["train_x"])))
    if ckpt is not None and not torch.equal(ckpt["labeled_idx"], kd.labeled_idx):
        raise Abort("--resume: the labeled split differs from the checkpoint's (different data?)")
    kd.x_pool = to_device_if_fits(data["train_x"], device)  # uint8 training images; y_pool: their labels (-1: unread)
    kd.x_test = to_device_if_fits(data["test_x"], device)  # test images, y_test their labels
    kd.y_pool = data["train_y"].to(device)
    kd.y_test = data["test_y"].to(device)
    kd.pad = kd.x_pool.shape[-1] // 8  # the crop's padding: 1/8 of the images' side
    kd.batch_eval = args.batch_size * (1 + args.mu)  # images per batch of evaluation and of the teacher's features
    if args.demo_teacher_steps:
        pretrain_demo_models(kd, data["teacher_x"], data["teacher_y"], args.demo_teacher_steps, (teacher, student))
    params = kd.student_side.parameters()  # S (with h), then P_g
    kd.opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    if kd.proj_custom is not None:
        kd.opt_custom = torch.optim.Adam(kd.proj_custom.parameters(), lr=args.lr_custom)
    if ckpt is not None:
        for key in PARTS:
            if getattr(kd, key) is not None:
                getattr(kd, key).load_state_dict(ckpt[key])
        kd.history = ckpt["history"]
        kd.t_start -= ckpt["wall_time_s"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    if PROC.rank == 0:  # the arguments, once; with --overwrite nothing of the old run survives
        for name in ["summary.json", "features.pt"] + ([] if args.resume else ["checkpoint.pt", "student.pt"]):
            if os.path.exists(out_file(args, name)):
                os.remove(out_file(args, name))
        save_atomic(json.dumps(vars(args), indent=2) + "\n", out_file(args, "args.json"))
        save_atomic("".join(json.dumps(row) + "\n" for row in kd.history), out_file(args, "metrics.jsonl"))
    if kd.teacher is not None:  # test features always (the teacher is frozen); train features with --teacher-cache
        build_teacher_cache(kd, args.teacher_cache, keep_features)
    sizes = f"{len(kd.labeled_idx)} labeled / {len(kd.unlabeled_idx)} unlabeled / {len(kd.x_test)} test"
    models = f"{args.student} <- {args.teacher if kd.teacher is not None else 'no teacher'}"
    machine = f"{device.type} x {PROC.world}, {'bf16' if kd.bf16 else 'fp32'}"
    cache = f"teacher features in {kd.time_cache:.1f}s"
    say(f"customkd: {args.dataset} {num_classes} classes, {sizes} | {models} | {machine} | {cache}")
    return kd


# ================================================================ 3. command line
DEMO = (  # --dataset synthetic: the offline demo's settings, as flags (any flag given on the command line wins)
    '--teacher vit_tiny_patch16_224 --teacher-kwargs {"depth":4,"patch_size":16} --teacher-res 32 --no-pretrained '
    "--student mobilenetv3_small_050 --student-res 32 --image-size 32 --synthetic-size 1600 --labels 160 --epochs 16 "
    "--batch-size 16 --mu 3 --lr 0.02 --lr-custom 0.01 --demo-teacher-steps 2000"
).split()
DEMO_CLASSES = 40  # the demo's generated classes: the student's task
DEMO_TEACHER_CLASSES = 400  # other generated classes, 40 images each: the demo teacher learns them all first
DEMO_STUDENT_CLASSES = 100  # the demo student learns the first 100 of them, for an eighth of the steps
PARTS = ("student", "proj_custom", "proj_general", "head_c", "opt", "opt_custom")  # a checkpoint's state dicts
IDENTITY = tuple(  # what a run is: --resume refuses a checkpoint written with other values (tools/large.py adds)
    "dataset labels split_seed teacher student teacher_kwargs student_kwargs train_dir synthetic_size image_size "
    "demo_teacher_steps".split()
)
METRIC_KEYS = tuple(  # each epoch's row in metrics.jsonl, in this order
    "epoch loss/customize loss/feat_custom loss/feat_general loss/sup loss/entropy acc/student "
    "acc/teacher_custom cka/student_vs_custom cka/student_vs_teacher rms/f_s rms/f_t_custom share/f_s_in_head "
    "time/customize_s time/distill_s time/eval_s throughput/customize_img_s throughput/distill_img_s "
    "throughput/eval_img_s mem/peak_mb".split()
)
PROC = SimpleNamespace(rank=0, world=1)  # this process under torchrun (section 6): its rank, and how many there are


class Abort(Exception):
    """Abort(message[, exit code, default 2]): a failure the user can act on; `main` prints it as one line."""


def fail(msg, code=2):
    rank = f"[rank {PROC.rank}] " if PROC.world > 1 else ""
    print(f"customkd: error: {rank}{msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def num(kind, lo, hi, open_lo=False):
    """argparse type: an int or float in [lo, hi] ((lo, hi] with open_lo); NaN fails every comparison."""
    what = f"{'a whole number' if kind is int else 'a number'} in {'(' if open_lo else '['}{lo}, {hi}]"

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            v = math.nan
        if not ((v > lo if open_lo else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


def json_object(s):
    """argparse type: JSON text -> dict, so that spacing never matters (and --resume compares values)."""
    try:
        value = json.loads(s)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        description="CustomKD: customize a frozen foundation teacher to a student, then distil",
        epilog=f"--dataset synthetic (the offline demo) sets: {' '.join(DEMO)}",
    )
    p.error = fail  # one line, exit 2, instead of argparse's usage dump
    count = num(int, 1, 10**6)
    seed = num(int, 0, 2**31 - 1)
    side = num(int, 8, 1024)
    weight = num(float, 0, 1000)
    rate = num(float, 0, 10, open_lo=True)
    add = p.add_argument_group("data").add_argument
    choices = ["cifar100", "cifar10", "synthetic", "folder"]
    add("--dataset", default="cifar100", choices=choices, help="CIFAR (downloaded), the offline demo, or class folders")
    add("--data-dir", default="./data", help="where CIFAR lives or is downloaded to (default ./data)")
    add("--train-dir", help="folder dataset: class folders of training images (the labeled candidates)")
    add("--test-dir", help="folder dataset: class folders of test images, none of them a training image")
    add("--cache-dir", help="the demo's models (tools/large.py: folders, teacher features) (DATA_DIR/decoded)")
    add("--image-size", type=side, default=224, help="side of stored synthetic/folder images (default 224)")
    add("--synthetic-size", type=num(int, 10, 10**6), help="synthetic: training images, test ones up to 1000 (1600)")
    add("--labels", default="10pct", help="labeled set: '10pct' of each class, '400' in all, or 'all' (default 10pct)")
    add("--split-seed", type=seed, default=0, help="seed of the labeled split (default 0)")
    add = p.add_argument_group("models (any timm name; the demo settings are below)").add_argument
    add("--teacher", default="vit_large_patch14_dinov2.lvd142m", help="frozen teacher (default %(default)s)")
    add("--student", default="mobilenetv3_large_100.ra_in1k", help="student (default %(default)s)")
    add("--teacher-kwargs", type=json_object, default={}, help='JSON of extra timm arguments for T: {"depth": 2}')
    add("--student-kwargs", type=json_object, default={}, help="JSON object of extra timm arguments for the student")
    add("--teacher-res", type=side, default=224, help="teacher input side in pixels (default 224)")
    add("--student-res", type=side, default=224, help="student input side in pixels (default 224)")
    add("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="hub weights (default on)")
    add("--teacher-weights", help="local teacher weight file, loaded by timm (position embeddings resized)")
    add("--student-weights", help="local student weight file, loaded by timm")
    add("--demo-teacher-steps", type=num(int, 0, 10**5), default=0, help="synthetic: demo teacher's training steps")
    add = p.add_argument_group("method (the loss weights and the two-stage schedule)").add_argument
    add("--w-custom", type=weight, default=1.0, help="weight of L_f~t, f_s against P_c(f_t) (default 1)")
    add("--w-general", type=weight, default=1.0, help="weight of L_ft = MSE(P_g(f_s), f_t) (default 1)")
    add("--w-sup", type=weight, default=1.0, help="weight of the supervised CE on labeled images (default 1)")
    add("--w-ent", type=weight, default=1.0, help="weight of entropy minimisation on unlabeled images (default 1)")
    add("--custom-every", type=count, default=1, help="stage 1 every N epochs (default 1: the paper's best)")
    add("--custom-steps", type=num(int, 0, 10**6), default=50, help="stage 1: at least N steps (default 50; 0: a pass)")
    add("--custom-head", default="student", choices=["student", "random"], help="head reading P_c(f_t) in stage 1")
    add("--custom-space", default="head", choices=["head", "full"], help="L_f~t in that head's row space, or full")
    add = p.add_argument_group("optimisation (--batch-size and --mu are global, at any process count)").add_argument
    add("--epochs", type=count, default=30, help="epochs, each = stage 1 + stage 2 (default 30)")
    add("--batch-size", type=count, default=64, help="labeled images per step (default 64)")
    add("--mu", type=num(int, 1, 1000), default=7, help="unlabeled per labeled image in a step (default 7)")
    add("--lr", type=rate, default=0.01, help="SGD rate of student and P_g, cosine decay (default 0.01)")
    add("--lr-custom", type=rate, default=1e-3, help="Adam learning rate of P_c (default 1e-3)")
    add("--weight-decay", type=num(float, 0, 1), default=5e-5, help="SGD weight decay (default 5e-5)")
    add = p.add_argument_group("speed").add_argument
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast (auto: on CUDA only)")
    add("--teacher-cache", action="store_true", help="teacher features of each image and its flip, once per run")
    add("--compile", action="store_true", help="torch.compile the teacher and the student side")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    add = p.add_argument_group("run").add_argument
    add("--seed", type=seed, default=0, help="seed of everything but the split (default 0)")
    add("--cka-samples", type=num(int, 0, 10**5), default=1000, help="test images for CKA; 0: off (default 1000)")
    add("--out-dir", help="run directory (default runs/DATASET-LABELS-seedSEED)")
    add = p.add_argument_group("run").add_mutually_exclusive_group().add_argument  # --resume or --overwrite
    add("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint.pt")
    add("--overwrite", action="store_true", help="replace the outputs of an existing run directory")
    return p


def parse_args(argv=None, parser=None):
    """Every flag checked before any work: values by the parser's types (build_parser()'s, or a parser that extends
    it), combinations here."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.dataset == "synthetic":  # the demo's settings, unless given on the command line
        p.set_defaults(**vars(p.parse_args(DEMO)))
        args = p.parse_args(argv)
    if args.dataset == "folder" and not (args.train_dir and args.test_dir):
        p.error("--dataset folder needs --train-dir and --test-dir")
    for k in ("train_dir", "test_dir", "demo_teacher_steps", "synthetic_size"):
        only = "folder" if k.endswith("dir") else "synthetic"
        if args.dataset != only and getattr(args, k) != p.get_default(k):
            p.error(f"--{k.replace('_', '-')} is only for --dataset {only}")
    for k in ("train_dir", "test_dir", "teacher_weights", "student_weights"):
        path = getattr(args, k)
        kind = "folder" if k.endswith("dir") else "file"
        if path is not None and not (os.path.isdir(path) if kind == "folder" else os.path.isfile(path)):
            p.error(f"--{k.replace('_', '-')} {path!r} is not an existing {kind}")
    args.cache_dir = args.cache_dir or os.path.join(args.data_dir, "decoded")
    args.out_dir = args.out_dir or os.path.join("runs", f"{args.dataset}-{args.labels}-seed{args.seed}")
    parse_labels(args.labels)  # raises Abort on nonsense, before any work
    return args


# ================================================================ 4. data
def make_synthetic(y, size, num_classes, seed=0):
    """Images of classes y: per class a smooth colour pattern, seen through nuisances that a few labels do not span:
    shifted by up to a quarter of the side, blended with one of 64 clutter patterns, colour-cast, lit, noisy."""
    g = torch.Generator().manual_seed(seed)
    n, pad = len(y), size // 4
    patterns = F.interpolate(torch.rand(num_classes + 64, 3, 4, 4, generator=g), size=size + 2 * pad, mode="bicubic")
    channels = torch.arange(3)[None, :, None, None]

    def crops(k):  # (n, 3, size, size): pattern k[i] for image i, shifted at random
        rows, cols = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=g) + torch.arange(size)
        return patterns[k[:, None, None, None], channels, rows[:, None, :, None], cols[:, None, None, :]]

    x = crops(y)
    clutter = 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    x = (1 - clutter) * x + clutter * crops(num_classes + torch.randint(0, 64, (n,), generator=g))
    cast = 0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=g)
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) * cast + 0.1 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def load_cifar(name, root, train):
    """CIFAR through torchvision; downloads when missing (unless HF_HUB_OFFLINE=1) and fails fast offline."""
    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    offline = os.getenv("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an offline node fails in seconds, not minutes
    try:  # download=True first checks the files (and unpacks an archive already in root)
        ds = cls(root, train=train, download=not offline)
    except Exception as e:
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(e).__name__}: {e}"
        fix = f"put {cls.filename} (or the extracted {cls.base_folder}/) in a folder and point --data-dir there"
        raise Abort(f"{name} is not in --data-dir {root!r} and could not be downloaded ({why}); {fix}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes


def list_folder(option, root, classes=None):
    """ImageFolder layout -> (files, labels, class names), checked against `classes`; nothing is decoded here."""
    extensions = tuple(Image.registered_extensions())
    try:
        found, to_idx = torchvision.datasets.folder.find_classes(root)
        items = torchvision.datasets.folder.make_dataset(os.path.abspath(root), to_idx, extensions, allow_empty=True)
    except OSError as e:
        raise Abort(f"cannot read image folder {option} {root!r}: {e}") from None
    if not items:
        raise Abort(f"{option} {root!r} holds no images")
    if classes is not None and found != classes:
        only_one = sorted(set(classes) ^ set(found))
        raise Abort(f"class folders differ between --train-dir and {option}: only in one of them: {only_one}")
    return [f for f, _ in items], [c for _, c in items], found


def decode(size, files):
    """files -> uint8 RGB (N, 3, size, size), shorter side resized, centre crop; and the files that cannot be read."""
    out = torch.zeros(len(files), 3, size, size, dtype=torch.uint8)
    bad = []
    for i, name in enumerate(files):
        try:
            with Image.open(name) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale that is still >= size
                out[i] = TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), size), size))
        except Exception as e:
            bad.append(f"{name} ({type(e).__name__})")
    return out, bad


def refuse_unreadable(bad, args):
    """Every unreadable file named: the first three in the error line, all of them in --cache-dir/unreadable.txt."""
    if bad:
        listed = os.path.join(args.cache_dir, "unreadable.txt")
        save_atomic("".join(f"{b}\n" for b in bad), listed)
        some = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise Abort(f"{len(bad)} image file(s) cannot be read: {some} (all in {listed}): remove or replace")


def load_data(args):
    """-> {train_x, train_y, test_x, test_y, classes}: uint8 (N, 3, H, W) images, their labels, the class names. (The
    data a run is given: `main(data=...)` replaces this function; its dict may add labeled_idx and unlabeled_idx.)"""
    if args.dataset == "synthetic":  # + images of other classes for the demo's pre-training, if it runs
        n = args.synthetic_size
        n_test = min(n, 1000)
        n_other = 40 * DEMO_TEACHER_CLASSES if args.demo_teacher_steps else 0
        y_other = DEMO_CLASSES + torch.arange(n_other) % DEMO_TEACHER_CLASSES
        y = torch.cat([torch.arange(n + n_test) % DEMO_CLASSES, y_other])
        x = make_synthetic(y, args.image_size, DEMO_CLASSES + DEMO_TEACHER_CLASSES)
        data = dict(train_x=x[:n], train_y=y[:n], test_x=x[n : n + n_test], test_y=y[n : n + n_test])
        data.update(teacher_x=x[n + n_test :], teacher_y=y[n + n_test :])  # the pre-training images
        return data | dict(classes=[str(k) for k in range(DEMO_CLASSES)])
    if args.dataset.startswith("cifar"):
        x, y, classes = load_cifar(args.dataset, args.data_dir, True)
        test_x, test_y, _ = load_cifar(args.dataset, args.data_dir, False)
        return dict(train_x=x, train_y=y, test_x=test_x, test_y=test_y, classes=classes)
    files, y, classes = list_folder("--train-dir", args.train_dir)
    test_files, test_y, _ = list_folder("--test-dir", args.test_dir, classes)
    refuse_shared(args, files, test_files)
    say(f"customkd: decoding {len(files) + len(test_files)} images (tools/large.py: once, in parallel)")
    x, bad = decode(args.image_size, files)
    test_x, bad_test = decode(args.image_size, test_files)
    refuse_unreadable(bad + bad_test, args)
    return dict(train_x=x, train_y=torch.tensor(y), test_x=test_x, test_y=torch.tensor(test_y), classes=classes)


def refuse_shared(args, train_files, test_files):
    """A test image that is also a training image (the same file, or through a linked folder) stops the run."""
    root = os.path.abspath(args.train_dir)
    train = {os.path.join(os.path.realpath(root), os.path.relpath(f, root)) for f in train_files}
    shared = [f for f in test_files if os.path.realpath(f) in train]
    if shared:
        which = f"{len(shared)} of the --train-dir images (e.g. {shared[0]})"
        raise Abort(f"--test-dir {args.test_dir!r} holds {which}; test images must not be training images")


def parse_labels(spec):
    """'10pct' -> ('pct', 10.0); '400' -> ('count', 400); 'all' -> ('all', 1). Raises Abort on nonsense."""
    s = str(spec).strip().lower()
    pct = re.fullmatch(r"(\d*\.?\d+)pct", s)
    if s == "all":
        return "all", 1
    if pct and 0 < float(pct[1]) <= 100:
        return "pct", float(pct[1])
    if s.isdigit() and int(s) > 0:
        return "count", int(s)
    raise Abort(f"--labels {spec!r}: expected a percentage in (0, 100] ('10pct'), a count or 'all'")


def split_labeled(targets, labels, num_classes, seed):
    """Class-balanced split of the training images' indices, its own generator -> sorted long labeled_idx."""
    targets = torch.as_tensor(targets).long()
    kind, v = parse_labels(labels)
    if kind == "count" and v % num_classes:
        raise Abort(f"--labels {labels}: a count must divide evenly by the {num_classes} classes")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = (targets == c).nonzero().flatten()
        k = {"all": len(idx), "count": v // num_classes, "pct": round(len(idx) * v / 100)}[kind]
        if k < 1 or k > len(idx):
            raise Abort(f"--labels {labels}: class {c} has {len(idx)} images, so it would get {k} labeled ones")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def plan_generator(seed, epoch, stage):
    """Each stage's data plan hangs on (seed, epoch, stage) alone: resuming needs no generator state."""
    key = hashlib.sha256(f"{seed}/{epoch}/{stage}".encode()).digest()  # torch seeds keep 32 bits only
    return torch.Generator().manual_seed(int.from_bytes(key[:4], "little"))


def epoch_plan(idx, batch, steps, gen, pad):
    """(steps, batch, 4) long: id, crop offsets (0..2*pad), flip; from `gen` alone, whatever the device or processes."""
    n = steps * batch
    passes = max(1, math.ceil(n / len(idx)))
    ids = torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(passes)])[:n]
    crop = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flip = torch.randint(0, 2, (n, 1), generator=gen)
    return torch.cat([ids[:, None], crop, flip], 1).view(steps, batch, 4)


def fetch(src, rows, device):
    """src[rows] on device, gathered where src lives; from the host through pinned memory (an asynchronous copy)."""
    out = src[rows.to(src.device, non_blocking=True)]
    if device.type == "cuda" and out.device.type == "cpu":
        out = out.pin_memory()
    return out.to(device, non_blocking=True)


def augment(pool, plan, device):
    """Planned images, reflect-padded by 1/8 of the side (4 px at 32 px), cropped, flipped: float [0, 255] on device."""
    x = fetch(pool, plan[:, 0], device)
    B, _, H, W = x.shape
    pad = H // 8
    x = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")  # (B, 3, H+2p, W+2p)
    dy, dx, flip = plan[:, 1:].to(device).T[..., None]  # (B, 1) each
    rows = dy + torch.arange(H, device=device)  # (B, H)
    cols = dx + torch.arange(W, device=device)  # (B, W)
    cols = torch.where(flip.bool(), cols.flip(1), cols)
    b = torch.arange(B, device=device)[:, None, None, None]
    c = torch.arange(3, device=device)[None, :, None, None]
    return x[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def to_device_if_fits(t, device):
    """t on a GPU when it fits in 40 % of the GPU's free memory; else t where it is (host memory, a mapped file)."""
    if device.type == "cuda" and t.nbytes <= 0.4 * torch.cuda.mem_get_info(device)[0]:
        return t.to(device)
    return t


# ================================================================ 5. models
def create_model(args, role, num_classes):
    """The --teacher or --student timm model (hub or file weights, or random; ViTs built for their res)."""
    name = getattr(args, role)
    weights = getattr(args, f"{role}_weights")
    kwargs = getattr(args, f"{role}_kwargs")
    if not timm.is_model(name):
        raise Abort(f"--{role}: unknown timm model {name!r} (list them with timm.list_models('*pattern*'))")
    overlay = dict(pretrained_cfg_overlay=dict(file=weights, source="timm")) if weights else {}
    try:  # a keyword argument that this file sets itself (num_classes, pretrained, ...) is a TypeError here
        kw = dict(num_classes=num_classes, pretrained=args.pretrained or bool(weights), **overlay, **kwargs)
        try:
            return timm.create_model(name, img_size=getattr(args, f"{role}_res"), **kw)
        except TypeError as e:  # a model without img_size (CNNs) takes any input size
            if "img_size" not in str(e):
                raise
            return timm.create_model(name, **kw)
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if isinstance(e, TypeError) or not (weights or args.pretrained):
            raise Abort(f"--{role} {name} with --{role}-kwargs {json.dumps(kwargs)}: {why}") from None
        hint = "" if weights else "; offline? --no-pretrained, --teacher-weights/--student-weights, or HF_HUB_OFFLINE=1"
        raise Abort(f"--{role} {name}: cannot load its weights from {weights or 'the hub'} ({why}){hint}") from None


def features(model, x):
    """Pooled pre-logits feature of any timm-style model: (B, d)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class StudentSide(nn.Module):
    """S with its head h and P_g as one module, so that one DDP wrapper averages all their gradients."""

    def __init__(self, student, proj_general):
        super().__init__()
        self.student = student
        self.proj_general = proj_general

    def forward(self, x):  # -> f_s (B, d_s), h(f_s) (B, C), P_g(f_s) (B, d_t) or None
        f_s = features(self.student, x)
        logits = self.student.get_classifier()(f_s)
        f_s_projected = self.proj_general(f_s) if self.proj_general is not None else None
        return f_s, logits, f_s_projected


def prepare_model(model, role, res, device, channels_last):
    """Checks a teacher or student (the methods this file calls, its input side), moves it to the device. -> (d, view):
    its feature's width, and its input: images resized to its side, normalised by its own timm config's mean, std."""
    need = ("forward_features", "forward_head") + (("get_classifier",) if role == "student" else ())
    missing = [m for m in need if not callable(getattr(model, m, None))]
    if missing:
        needs = f"a {role} needs {', '.join(need)} (forward_head(x, pre_logits=True): the pooled feature)"
        raise Abort(f"--{role} {type(model).__name__} has no {', '.join(missing)}: {needs}")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:  # shapes from a dummy forward, in eval mode so BatchNorm statistics stay untouched
        with torch.no_grad():
            d = features(model.eval(), torch.zeros(1, 3, res, res, device=device)).shape[1]
    except Exception as e:
        raise Abort(f"--{role} cannot take --{role}-res {res}: {(str(e).splitlines() or [''])[0]}") from None
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(cfg[k], device=device).view(1, 3, 1, 1) * 255 for k in ("mean", "std"))

    def view(x):  # float (B, 3, H, W) in [0, 255] -> normalised (B, 3, res, res)
        if x.shape[-1] != res:
            x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=x.shape[-1] > res)
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    return d, view


def build(kd, num_classes, teacher=None, student=None):
    """Models (the teacher if a feature loss needs it), projectors, views and the DDP-wrapped, compiled forwards."""
    args, device = kd.args, kd.device
    use_teacher = args.w_custom > 0 or args.w_general > 0
    with torch.random.fork_rng(devices=[]):  # the demo's models are one fixed pair, as downloaded weights would be
        torch.manual_seed(0 if args.demo_teacher_steps else args.seed)
        if student is None:
            student = create_model(args, "student", num_classes)
        if teacher is None and use_teacher:
            teacher = create_model(args, "teacher", 0)
    kd.d_s, kd.view_s = prepare_model(student, "student", args.student_res, device, kd.bf16)  # width of f_s; S's input
    if use_teacher:
        kd.d_t, kd.view_t = prepare_model(teacher, "teacher", args.teacher_res, device, kd.bf16)  # the same for T
    kd.student = student  # S, with h
    kd.head = student.get_classifier()  # h
    if kd.head(torch.zeros(1, kd.d_s, device=device)).shape[-1] != num_classes:
        raise Abort(f"the student head must output {num_classes} classes")
    compiled = torch.compile if args.compile else nn.Identity()  # nn.Identity()(f) is f
    if use_teacher:
        kd.teacher = teacher.eval().requires_grad_(False)  # frozen, always
        kd.feat_t = compiled(partial(features, teacher))  # f_t = T(x)
    make_projectors(kd, num_classes)
    ddp = partial(nn.parallel.DistributedDataParallel, forward_sync_buffers=False) if PROC.world > 1 else nn.Identity()
    if kd.proj_custom is not None:
        set_stage(kd, 1)  # DDP averages the gradients of what requires grad when it is built
        kd.customizer = ddp(nn.Sequential(kd.proj_custom, kd.head_c))  # f_t -> h(P_c(f_t))
    set_stage(kd, 2)
    kd.student_side = compiled(ddp(StudentSide(student, kd.proj_general)))  # stage 2's x -> f_s, h(f_s), P_g(f_s)


def pretrain_demo_models(kd, x, y, steps, own=()):
    """Demo only: the teacher (`steps` on 400 other classes) and the student (an eighth of them on 100) first learn,
    as a foundation model and an ImageNet student; `own`: as given. Kept in --cache-dir by recipe, as hub weights."""
    few = y < DEMO_CLASSES + DEMO_STUDENT_CLASSES
    recipes = {"teacher": (steps, 0, 1e-3, x, y), "student": (steps // 8, 1, 3e-3, x[few], y[few])}
    for role, (n, seed, lr, x, y) in recipes.items():  # steps, seed, Adam's learning rate, images, classes
        model, view, d = (kd.teacher, kd.view_t, kd.d_t) if role == "teacher" else (kd.student, kd.view_s, kd.d_s)
        if model is None or any(model is m for m in own):
            continue
        a = kd.args
        recipe = [role, getattr(a, role), getattr(a, f"{role}_kwargs"), getattr(a, f"{role}_res"), n, seed, lr, kd.bf16]
        path = os.path.join(a.cache_dir, f"demo-{role}-{fingerprint(recipe, model, x, y)}.pt")  # + initial weights
        what = f"demo {role} ({n} steps on {len(x)} images of other classes)"
        try:  # an earlier run's; weights_only: never runs pickled code
            state = torch.load(path, map_location="cpu", weights_only=True)
            say(f"customkd: {what} read from {path}, made by an earlier run")
        except (OSError, RuntimeError):  # none yet (or none readable), or one cut short (a bad copy, a full disk)
            say(f"customkd: {what}, once, into {path}")
            state = pretrain(kd, model, view, d, x, y, n, seed, lr)
            if PROC.rank == 0:
                save_atomic(state, path)
        model.load_state_dict(state)
        if PROC.world > 1:  # every process keeps rank 0's (kernels may differ)
            for p in model.parameters():
                dist.broadcast(p.data, 0)
    set_stage(kd, 2)  # the teacher frozen from now on


def pretrain(kd, model, view, d, x, y, steps, seed, lr):
    """Trains model on the images x of classes y through a temporary linear head (Adam, batches of 64). -> its state"""
    with torch.random.fork_rng(devices=[]):  # the same demo models whichever projectors were built before
        torch.manual_seed(seed)
        head = nn.Linear(d, int(y.max() - y.min()) + 1).to(kd.device)
    opt = torch.optim.Adam([*model.train().requires_grad_(True).parameters(), *head.parameters()], lr=lr)
    for plan in epoch_plan(torch.arange(len(x)), 64, steps, torch.Generator().manual_seed(seed), x.shape[-1] // 8):
        with kd.amp():
            logits = head(features(model, view(augment(x, plan, kd.device))))
        take_step(opt, F.cross_entropy(logits.float(), (y[plan[:, 0]] - y.min()).to(kd.device)))
    return {k: v.cpu() for k, v in model.state_dict().items()}


def teacher_features(kd, plan=None, x=None):
    """f_t (B, d_t) from --teacher-cache (the plan's flip picks the view), else T(x or the plan's images)."""
    if kd.cache_train is not None and plan is not None:
        return fetch(kd.cache_train, plan[:, 0] * 2 + plan[:, 3], kd.device).float()
    if x is None:
        x = augment(kd.x_pool, plan, kd.device)
    with torch.inference_mode(), kd.amp():
        f_t = kd.feat_t(kd.view_t(x))
    return f_t.clone()  # a normal tensor again, so that autograd may save it


def build_teacher_cache(kd, with_train, keep=None):
    """Teacher features, once (T is frozen): of the test images; with --teacher-cache also of every training image and
    of its mirror image (rows 2i and 2i + 1), so that no epoch runs the teacher. Every process computes all of them.
    keep(kd, make): a hook that may keep them for later runs (tools/large.py: on disk); default make()."""
    t0 = clock(kd.device)

    def compute(x, views):  # -> (N * views, d_t) on the host: each image, and with 2 views its mirror image after it
        out = []
        for i in range(0, len(x), kd.batch_eval):
            v = x[i : i + kd.batch_eval].to(kd.device).float()
            f_t = torch.stack([teacher_features(kd, x=v.flip(-1) if flip else v) for flip in range(views)], 1)
            out.append(f_t.flatten(0, 1).to("cpu", torch.bfloat16 if kd.bf16 else torch.float32))
        return torch.cat(out)

    def make():
        return {"cache_train": compute(kd.x_pool, 2), "cache_test": compute(kd.x_test, 1)}

    if not with_train:
        say(f"customkd: teacher features of {len(kd.x_test)} test images")
        saved = {"cache_test": compute(kd.x_test, 1)}
    elif keep is not None:
        saved = keep(kd, make)
    else:
        say(f"customkd: teacher features of {len(kd.x_pool)} training images, mirrored too, and the test images")
        saved = make()
    if with_train:
        kd.cache_train = to_device_if_fits(saved["cache_train"], kd.device)  # image i at row 2i, its mirror at 2i+1
    kd.cache_test = to_device_if_fits(saved["cache_test"], kd.device)  # (N_test, d_t)
    kd.time_cache = clock(kd.device) - t0


def fingerprint(about, model, *arrays):
    """A cached file's name: 16 hex digits of a SHA-1 over JSON `about`, model's weights and buffers, the arrays."""
    h = hashlib.sha1(json.dumps(about).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for x in arrays:
        h.update(x.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


# ================================================================ 6. several processes (torchrun)
def init_process(args):
    """torchrun sets WORLD_SIZE, RANK, LOCAL_RANK: one process per GPU (NCCL) or per CPU share (gloo). -> device"""
    PROC.world = int(os.environ.get("WORLD_SIZE", 1))
    PROC.rank = int(os.environ.get("RANK", 0))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise Abort(f"--device cuda, but this torch {torch.__version__} sees no CUDA device; use --device cpu")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if PROC.world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shard(t):
    """This process's equal share of a global batch (dim 0): together they see what one process would."""
    k = len(t) // PROC.world
    return t[PROC.rank * k : (PROC.rank + 1) * k]


def global_batch(batch, n):
    """The global batch: at most the n images, split evenly over the processes."""
    if min(batch, n) < PROC.world:
        raise Abort(f"a batch of {min(batch, n)} images cannot be split over {PROC.world} processes")
    return min(batch, n) // PROC.world * PROC.world


def average_buffers(model):
    """BatchNorm running statistics: kept per process within an epoch, averaged over the processes at its end."""
    if PROC.world > 1:
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= PROC.world


# ================================================================ 7. logs, checkpoints, errors, main
def timings(stage, t0, n_img, device):
    """A stage's seconds since t0 and its images per second, under their log keys."""
    seconds = clock(device) - t0
    return {f"time/{stage}_s": seconds, f"throughput/{stage}_img_s": n_img / seconds}


def epoch_means(kd, epoch, log):
    """Means of a stage's loss terms over steps and processes; a non-finite term stops the run, naming it."""
    terms = {k: torch.stack([step[k].float() for step in log]) for k in log[0]}  # (steps,) each
    if PROC.world > 1:
        for v in terms.values():
            dist.all_reduce(v)
            v /= PROC.world
    bad = ~torch.stack(list(terms.values())).isfinite()  # (terms, steps)
    if bad.any():  # the terms that were non-finite first (later steps inherit the damage)
        culprits = [k for k, b in zip(terms, bad[:, bad.any(0).nonzero()[0, 0]]) if b]
        kept = f"the checkpoint of epoch {epoch} in {kd.args.out_dir} is kept" if epoch else "no checkpoint was written"
        fix = "lower --lr or that loss weight" + (", then --resume" if epoch else "")
        raise Abort(f"{' and '.join(culprits)} became non-finite in epoch {epoch + 1}; stopped; {kept} ({fix})", 3)
    return {k: v.mean().item() for k, v in terms.items()}


def save_epoch(kd, row):
    """The epoch's row, an atomic checkpoint and the deployable student (rank 0 writes)."""
    if kd.device.type == "cuda":  # the epoch's peak CUDA allocations
        row["mem/peak_mb"] = torch.cuda.max_memory_allocated(kd.device) / 2**20
        torch.cuda.reset_peak_memory_stats(kd.device)
    else:  # the process's peak RSS so far (Linux: KiB)
        row["mem/peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kd.history.append(row)
    if PROC.rank == 0:
        ckpt = dict(
            identity={k: getattr(kd.args, k, None) for k in IDENTITY},
            epoch=row["epoch"],
            history=kd.history,
            labeled_idx=kd.labeled_idx,
            wall_time_s=time.time() - kd.t_start,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state_all() if kd.device.type == "cuda" else [],
            **{k: getattr(kd, k).state_dict() if getattr(kd, k) is not None else {} for k in PARTS},
        )
        save_atomic(ckpt, out_file(kd.args, "checkpoint.pt"))
        student = dict(state_dict=kd.student.state_dict(), model=kd.args.student, num_classes=len(kd.head.weight))
        save_atomic(student, out_file(kd.args, "student.pt"))
        save_atomic("".join(json.dumps(h) + "\n" for h in kd.history), out_file(kd.args, "metrics.jsonl"))
    say(console_line(row, kd.args.epochs))


def summarise(kd):
    """summary.json and features.pt (rank 0 writes), and the run's last line. -> the summary dict"""
    h = kd.history  # never empty: --epochs >= 1, and a checkpoint holds an epoch at least
    summary = dict(
        acc_student_last=h[-1]["acc/student"],  # the result
        acc_student_best=max(row["acc/student"] for row in h),  # the best epoch's, named as such
        acc_teacher_custom_last=h[-1]["acc/teacher_custom"],
        epochs=len(h),
        num_labeled=len(kd.labeled_idx),
        num_unlabeled=len(kd.unlabeled_idx),
        num_train_images=len(kd.x_pool),
        world_size=PROC.world,
        wall_time_s=time.time() - kd.t_start,
    )
    summary["time/teacher_cache_s"] = kd.time_cache
    for k in ("time/customize_s", "time/distill_s", "time/eval_s"):
        summary[k] = sum(row[k] or 0 for row in h)
    summary["mem/peak_mb"] = max(row["mem/peak_mb"] for row in h)
    if PROC.rank == 0:
        save_atomic(kd.sample, out_file(kd.args, "features.pt"))  # f_s, f_t, f_t_custom, y: CKA's sample
        save_atomic(json.dumps(summary, indent=2) + "\n", out_file(kd.args, "summary.json"))
    accuracy = f"{summary['acc_student_last']:.4f} (best epoch: {summary['acc_student_best']:.4f})"
    wall = f"{summary['wall_time_s']:.0f}s"
    say(f"customkd: last-epoch student accuracy {accuracy}; wall {wall}; outputs in {kd.args.out_dir}")
    return summary


def save_atomic(obj, path):
    """Write a temporary file, fsync, rename: a crash or a full disk never breaks `path`. str: text, else torch.save."""
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            if isinstance(obj, str):
                f.write(obj.encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder that cannot be written
        name = os.path.basename(path)
        raise Abort(
            f"cannot write {path} ({e.strerror}); any earlier {name} is intact: fix that, rerun or --resume"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def out_file(args, name):
    return os.path.join(args.out_dir, name)


def make_run_folder(args):
    """--out-dir, refused if it holds a run (unless --resume or --overwrite), made and written to before any work.
    -> its path if this run made it (so that it goes again if left empty)"""
    new = not os.path.exists(args.out_dir)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun the others see the folder that rank 0 made
    if rank0 and os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not (args.resume or args.overwrite):
        raise Abort(f"run directory {args.out_dir} exists: --resume continues it, --overwrite replaces it")
    probe = os.path.join(args.out_dir, f".probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise Abort(f"--out-dir {args.out_dir!r} cannot be made or written to ({e.strerror})") from None
    return args.out_dir if new else None


def load_checkpoint(args):
    """Load with weights_only=True (never runs pickled code) and refuse a checkpoint of another run."""
    path = out_file(args, "checkpoint.pt")
    try:  # a missing file too
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Abort(f"--resume: no readable CustomKD checkpoint at {path} ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "identity" not in ckpt:
        raise Abort(f"--resume: no readable CustomKD checkpoint at {path} (a file of another kind)")
    for k in IDENTITY:
        if ckpt["identity"].get(k) != getattr(args, k, None):
            was = f"--{k.replace('_', '-')} {ckpt['identity'].get(k)}, not {getattr(args, k, None)}"
            raise Abort(f"--resume: {path} was written with {was}; use the original value or another --out-dir")
    return ckpt


def how_to_go_on(args):
    """After a run stopped: resume from its last checkpoint, or, if no epoch had finished, start it again."""
    if args is not None and os.path.exists(out_file(args, "checkpoint.pt")):
        return "checkpoint.pt is intact: add --resume"
    return "no epoch had finished, so there is no checkpoint: start again (with --overwrite if the run folder is left)"


def console_line(row, epochs):
    """One aligned line per epoch: losses by their paper symbols, accuracies, CKA, stage-2 time and speed."""

    def v(key, spec):  # a value, or '-' as wide, for a term that is not computed
        return format(row[key], spec) if row[key] is not None else "-".rjust(len(format(0.0, spec)))

    return (
        f"epoch {row['epoch']:3d}/{epochs} | L_cust {v('loss/customize', '6.3f')} | L_f~t "
        f"{v('loss/feat_custom', '7.4f')} L_ft {v('loss/feat_general', '7.4f')} L_L {v('loss/sup', '6.3f')} L_U "
        f"{v('loss/entropy', '6.3f')} | acc {v('acc/student', '.4f')} teacher_custom {v('acc/teacher_custom', '.4f')} "
        f"| cka f~t {v('cka/student_vs_custom', '.3f')} f_t {v('cka/student_vs_teacher', '.3f')} | "
        f"{v('time/distill_s', '6.1f')}s {v('throughput/distill_img_s', '6.0f')} img/s {v('mem/peak_mb', '6.0f')} MB"
    )


def say(line):
    if PROC.rank == 0:
        print(line, flush=True)


def clock(device):
    """Seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(argv=None, teacher=None, student=None, parse=parse_args, **hooks):
    """The CLI -> the summary dict; `teacher`/`student`: your own modules; parse(argv) -> args, and setup's hooks (data,
    keep_features): how tools/large.py extends this file. Expected failures (flags, data, files, disk, interruption,
    a non-finite loss) are one line and an exit code; anything else shows its traceback."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends a run as Ctrl-C does
    made = None
    args = None
    try:
        args = parse(argv)
        made = make_run_folder(args)
        out = run(args, teacher, student, **hooks)
        if dist.is_initialized():
            dist.destroy_process_group()
        return out
    except Abort as e:
        fail(*e.args)
    except KeyboardInterrupt:
        if PROC.rank > 0:
            raise SystemExit(130)
        fail(f"interrupted (Ctrl-C, SIGTERM, or a failed torchrun process); {how_to_go_on(args)}", 130)
    except dist.DistError as e:  # another process of the torchrun job died; its own error says why
        fail(f"another torchrun process failed ({type(e).__name__}); {how_to_go_on(args)}", 1)
    except Exception as e:
        traceback.print_exc()
        what = "a bug (in this file or in code you passed to it) or a fault of the machine"
        fail(f"unexpected {type(e).__name__} (traceback above): {what}; out of memory? lower --batch-size", 1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if made and not os.listdir(made):  # a run that stopped before writing anything leaves no folder behind
            os.rmdir(made)


if __name__ == "__main__":
    main()
