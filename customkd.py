"""CustomKD in one file: customize a frozen vision foundation model to an edge student, then distil.

Paper: J. Lee, D. Das, M. Hayat, S. Choi, K. Hwang, F. Porikli, "CustomKD: Customizing Large Vision Foundation for
Edge Model Improvement via Knowledge Distillation", CVPR 2025, arXiv:2503.18244.

Section 1 is all of CustomKD, top-down as in the paper's Fig. 2, and reads alone; the lines that *are* the method are
tagged `# [CustomKD]`. Section 2 declares everything a run holds; sections 3-7 (command line, data, models, several
processes, bookkeeping) are reference material.
  python customkd.py --dataset cifar100 --labels 10pct     # the main job (GPU + internet)
  python customkd.py --dataset synthetic                   # the offline CPU demo
  HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py    # the tests (CPU, no network)
Measured demo (torch 2.14.1, timm 1.0.31; seeds 0-4 one at a time; CustomKD / L_ft only / no teacher; chance 0.025):
2-core AMD EPYC (AVX2) 0.905+-0.015 / 0.893+-0.017 / 0.898+-0.026, ~111 s a run: CustomKD ahead of L_ft only on 4
seeds of 5 by 0.011 (t = 1.5, not significant); the teacher adds nothing measurable. CIFAR-100, GPU: not yet measured.
"""
import argparse, difflib, errno, hashlib, io, json, math, os, resource, shutil, signal, socket, sys, time  # noqa: E401
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Callable

import timm, torch, torchvision  # noqa: E401
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
# ================================================================ 1. the method: all of CustomKD (paper Sec. 3, Fig. 2)
def run(args, teacher=None, student=None):
    """The paper's loop: every epoch customizes the teacher to the student (stage 1), then distils it (stage 2)."""
    kd = setup(args, teacher, student)  # models, projectors, data, optimizers, run folder: section 7
    for epoch in range(len(kd.history), args.epochs):  # from the checkpoint's epoch with --resume
        row = {**dict.fromkeys(METRIC_KEYS), 'epoch': epoch + 1}
        if kd.proj_custom is not None and epoch % args.custom_every == 0:      # [CustomKD] alternate 1:1 (paper)
            timed(kd, row, 'customize', customize_epoch, epoch)                # [CustomKD] stage 1
        timed(kd, row, 'distill', distill_epoch, epoch)                        # [CustomKD] stage 2
        timed(kd, row, 'eval', evaluate)
        save_epoch(kd, row)
    return summarise(kd)

def customize_epoch(kd, epoch):
    """[CustomKD] Stage 1, feature customization: one pass over D_L that trains only P_c, through the frozen h."""
    set_stage(kd, 1)
    b, log = global_batch(kd.args.batch_size, len(kd.labeled_idx)), []
    plan = epoch_plan(kd.labeled_idx, b, len(kd.labeled_idx) // b, plan_generator(kd, epoch, 1), kd.pad)  # one pass
    for p in progress(plan, 'stage 1', len(plan) * b, b):  # p: b rows of (image id, crop dy, crop dx, flip)
        p = shard(p)                                                           # this process's share of the batch
        f_t = teacher_features(kd, p)                                          # (B, d_t), T frozen
        with kd.amp():
            logits = kd.customizer(f_t)  # [CustomKD] (B, C) = h(P_c(f_t)): customizer is P_c, then the frozen head h
        loss = loss_customize(logits, fetch(kd.y_pool, p[:, 0], kd.device))   # [CustomKD] L_cust
        take_step(kd.opt_custom, loss)                                         # opt_custom holds P_c's weights alone
        log.append({'loss/customize': loss.detach()})
    return epoch_means(kd, epoch, log), len(plan) * b

def distill_epoch(kd, epoch):
    """[CustomKD] Stage 2, distillation: one pass over D_U; each step also takes a batch of D_L (cycled)."""
    set_stage(kd, 2)
    a, log, gen = kd.args, [], plan_generator(kd, epoch, 2)
    b_l, b_u = global_batch(a.batch_size, len(kd.labeled_idx)), global_batch(a.mu * a.batch_size, len(kd.unlabeled_idx))
    steps = len(kd.unlabeled_idx) // b_u
    plans_l = epoch_plan(kd.labeled_idx, b_l, steps, gen, kd.pad)             # (steps, b_l, 4): D_L, cycled
    plans_u = epoch_plan(kd.unlabeled_idx, b_u, steps, gen, kd.pad)           # (steps, b_u, 4): one pass over D_U
    weights = {'loss/feat_custom': a.w_custom, 'loss/feat_general': a.w_general, 'loss/sup': a.w_sup,
               'loss/entropy': a.w_ent}
    for step, (plan_l, plan_u) in enumerate(progress(zip(plans_l, plans_u), 'stage 2', steps * (b_l + b_u), b_l + b_u)):
        for group in kd.opt.param_groups:  # cosine decay over all stage-2 steps of the run, no warm-up
            group['lr'] = a.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / (a.epochs * steps)))
        plan_l = shard(plan_l)
        p = torch.cat([plan_l, shard(plan_u)])                                 # this process's share of [x_l; x_u]
        x = augment(kd.x_pool, p, kd.device)                                   # one view for teacher and student
        f_t = teacher_features(kd, p, x) if kd.teacher is not None else None   # (B, d_t), no gradient
        terms = distill_step(kd, x, fetch(kd.y_pool, plan_l[:, 0], kd.device), f_t)
        take_step(kd.opt, sum(weights[k] * v for k, v in terms.items()))       # [CustomKD] the weighted sum
        log.append({k: v.detach() for k, v in terms.items()})
    average_buffers(kd.student)  # several processes: BatchNorm statistics (section 6)
    return epoch_means(kd, epoch, log), steps * (b_l + b_u)

def distill_step(kd, x, y_l, f_t):
    """[CustomKD] The four stage-2 terms on one batch x = [x_l; x_u]. Returns {log key: term}."""
    n_l = len(y_l)
    with kd.amp():
        f_s, logits, f_s_projected = kd.student_side(kd.view_s(x))           # (B, d_s), (B, C), (B, d_t) or None
        terms = {'loss/sup': loss_sup(logits[:n_l], y_l),                     # [CustomKD] L_L on D_L
                 'loss/entropy': loss_entropy(logits[n_l:])}                  # [CustomKD] L_U on D_U
        if kd.proj_custom is not None:
            with torch.no_grad():
                f_t_custom = kd.proj_custom(f_t)                              # (B, d_s): f~_t, P_c frozen
            terms['loss/feat_custom'] = loss_feat_custom(f_s, f_t_custom)     # [CustomKD] L_f~t
        if f_s_projected is not None:
            terms['loss/feat_general'] = loss_feat_general(f_s_projected, f_t)  # [CustomKD] L_ft
    return terms

def loss_customize(logits, y):
    """Stage 1, L_cust = CE(h(P_c(f_t)), y): the frozen student head reads the customized teacher feature."""
    return F.cross_entropy(logits.float(), y, reduction='mean')

def loss_feat_custom(f_s, f_t_custom):
    """L_f~t = MSE(f_s, sg(f~_t)): imitate the customized, task-specific teacher feature."""
    return F.mse_loss(f_s.float(), f_t_custom.detach().float(), reduction='mean')

def loss_feat_general(f_s_projected, f_t):
    """L_ft = MSE(P_g(f_s), sg(f_t)): imitate the original, task-general teacher feature."""
    return F.mse_loss(f_s_projected.float(), f_t.detach().float(), reduction='mean')

def loss_sup(logits_l, y_l):
    """L_L = CE(h(f_s_l), y_l) on the labeled images."""
    return F.cross_entropy(logits_l.float(), y_l, reduction='mean')

def loss_entropy(logits_u):
    """L_U = mean_b H(softmax(h(f_s_u))), H(p) = -sum_c p_c log p_c, on the unlabeled images."""
    logp = logits_u.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()

@torch.no_grad()
def evaluate(kd):
    """Test accuracy of the student and of h(P_c(f_t)); linear CKA of f_s with f~_t and f_t. -> (metrics, #images)"""
    kd.student.eval()
    with kd.amp():
        f_s = sharded_rows(len(kd.x_test), kd.batch_eval, lambda i, j: kd.student_side(kd.view_s(
            kd.x_test[i:j].to(kd.device).float()))[0].float(), kd.device, kd.device, 'evaluation')  # (N, d_s)
    out = {'acc/student': (kd.head(f_s).argmax(-1) == kd.y_test).float().mean().item(),
           'rms/f_s': f_s.pow(2).mean().sqrt().item()}                   # root-mean-square: the feature's scale
    feats = {'f_s': f_s, 'y': kd.y_test} | ({} if kd.teacher is None else {'f_t': kd.cache_test.float().to(kd.device)})
    if kd.proj_custom is not None:
        feats['f_t_custom'] = f_t_custom = kd.proj_custom(feats['f_t'])                      # (N, d_s)
        out['acc/teacher_custom'] = (kd.head_c(f_t_custom).argmax(-1) == kd.y_test).float().mean().item()
        out['rms/f_t_custom'] = f_t_custom.pow(2).mean().sqrt().item()                    # the target's scale
    kd.sample = {k: v[kd.cka_idx.to(kd.device)].cpu() for k, v in feats.items()}  # the end's goes to features.pt
    if len(kd.sample['f_s']) > 1:  # the CKA rows, drawn once above
        out.update({f'cka/student_vs_{n}': linear_cka(kd.sample['f_s'], kd.sample[k])
                    for k, n in (('f_t_custom', 'custom'), ('f_t', 'teacher')) if k in feats})
    return out, len(kd.x_test)

def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred; x (n, p), y (n, q)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()

def make_projectors(kd, num_classes):
    """[CustomKD] The two projectors, one linear layer each (the paper: "a projection layer"); d_t, d_s measured."""
    if kd.args.w_custom > 0:  # [CustomKD] P_c: d_t -> d_s, the customization projector (paper θ_t^h)
        # P_c(f_t) is a *target for f_s*, so it ends where f_s ends (a gap the paper leaves): timm's MobileNetV3
        # pre-logits come out of `act2` (Hardswish, min -0.375) after `conv_head`; other students: identity.
        act = getattr(kd.student, 'act2', None)
        end = type(act)() if hasattr(kd.student, 'conv_head') and isinstance(act, nn.Module) else nn.Identity()
        kd.proj_custom = nn.Sequential(nn.Linear(kd.d_t, kd.d_s), end).to(kd.device)
        kd.head_c = kd.head if kd.args.custom_head == 'student' else \
            nn.Linear(kd.d_s, num_classes).to(kd.device).requires_grad_(False)  # ablation: a random frozen head
    if kd.args.w_general > 0:  # [CustomKD] P_g: d_s -> d_t, the general projector on the student side
        kd.proj_general = nn.Linear(kd.d_s, kd.d_t).to(kd.device)

def set_stage(kd, stage):
    """Frozen means frozen: stage 1 may change only P_c; stage 2 only the student (with h) and P_g."""
    for module, trainable in ((kd.teacher, False), (kd.proj_custom, stage == 1), (kd.student, stage == 2),
                              (kd.proj_general, stage == 2)):
        if module is not None:
            module.requires_grad_(trainable).train(trainable)  # the teacher: no gradients, eval mode, always

def take_step(opt, loss):
    """One optimizer step on `loss` (SGD for the student side, Adam for P_c); under DDP, averaged gradients."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
# ================================================================ 2. the run's state
@dataclass(eq=False)
class Run:
    """Everything one run holds (`kd` in every function), each field once; setup() and build() fill it in."""
    args: argparse.Namespace                      # the checked flags (section 3)
    device: torch.device = None                   # cpu, or cuda:LOCAL_RANK
    # models (section 5): T frozen; S with its linear head h = S.get_classifier(); the projectors (section 1)
    teacher: nn.Module = None                     # T; None when both feature weights are 0
    student: nn.Module = None                     # S, with h
    d_t: int = 0                                  # width of f_t, from a dummy forward
    d_s: int = 0                                  # width of f_s
    proj_custom: nn.Module = None                 # P_c: d_t -> d_s (then S's last activation); None if w_custom = 0
    proj_general: nn.Module = None                # P_g: d_s -> d_t; None if w_general = 0
    head_c: nn.Module = None                      # the head stage 1 reads P_c(f_t) through: h, or a random frozen one
    customizer: nn.Module = None                  # stage 1's forward f_t -> head_c(P_c(f_t)) (DDP under torchrun)
    student_side: nn.Module = None                # stage 2's forward x -> f_s, h(f_s), P_g(f_s) (StudentSide)
    feat_t: Callable = None                       # x -> f_t (compiled with --compile)
    view_t: Callable = None                       # images in [0, 255] -> T's input: its size, its mean and std
    view_s: Callable = None                       # the same for S
    opt: torch.optim.Optimizer = None             # stage 2: SGD over S (with h) and P_g
    opt_custom: torch.optim.Optimizer = None      # stage 1: Adam over P_c alone
    # data (section 4): uint8 (N, 3, H, W) images, on the device when they fit
    x_pool: torch.Tensor = None                   # training images: the labeled candidates, then --unlabeled-dir's
    y_pool: torch.Tensor = None                   # their labels (-1: never read)
    labeled_idx: torch.Tensor = None              # D_L, rows of x_pool
    unlabeled_idx: torch.Tensor = None            # D_U, rows of x_pool
    x_test: torch.Tensor = None                   # test images
    y_test: torch.Tensor = None                   # their labels
    cache_test: torch.Tensor = None               # f_t of every test image, computed once (N_test, d_t)
    cache_train: torch.Tensor = None              # --teacher-cache: f_t of each training image and its flip (2N, d_t)
    # progress (section 7; a checkpoint restores history and t_start)
    history: list = field(default_factory=list)   # one metrics row per epoch run so far
    t_start: float = field(default_factory=time.time)  # start of the run, earlier sessions' wall time included
    time_cache: float = 0.0                       # seconds spent on the teacher features
    sample: dict = field(default_factory=dict)    # the last evaluation's f_s, f_t, f_t_custom, y on the CKA rows
    def amp(self):  # bf16 autocast, or nothing
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
    head = property(lambda self: self.student.get_classifier())                      # h
    pad = property(lambda self: self.x_pool.shape[-1] // 8)                          # crop padding: 1/8 of the side
    batch_eval = property(lambda self: self.args.batch_size * (1 + self.args.mu))    # images per evaluation batch
    bf16 = property(lambda self: self.args.precision in ('bf16', 'auto' if self.device.type == 'cuda' else 'bf16'))
    cka_idx = property(lambda self: torch.randperm(len(self.x_test), generator=torch.Generator().manual_seed(0))[
        :self.args.cka_samples])                                                     # test rows of CKA, features.pt
# ================================================================ 3. command line
COMMON = dict(teacher='vit_large_patch14_dinov2.lvd142m', student='mobilenetv3_large_100.ra_in1k', teacher_kwargs={},
              student_kwargs={}, teacher_res=224, student_res=224, pretrained=True, epochs=30, lr=0.01, lr_custom=1e-3,
              batch_size=64, mu=7, labels='10pct', image_size=224, synthetic_size=None, demo_teacher_steps=0)
PRESETS = {'synthetic': dict(teacher='vit_tiny_patch16_224', teacher_kwargs={'depth': 4, 'patch_size': 16},
                             student='mobilenetv3_small_050', teacher_res=32, student_res=32, pretrained=False,
                             epochs=8, lr=0.02, lr_custom=0.01, batch_size=16, mu=3, labels='160', image_size=32,
                             synthetic_size=1600, demo_teacher_steps=240)}
DEMO_CLASSES, DEMO_TEACHER_CLASSES, DEMO_TEACHER_IMAGES = 40, 100, 4000  # the demo's generated classes (section 3)
PARTS = ('student', 'proj_custom', 'proj_general', 'head_c', 'opt', 'opt_custom')  # a checkpoint's state dicts
IDENTITY = ('dataset', 'labels', 'labeled_list', 'split_seed', 'teacher', 'student', 'teacher_kwargs',
            'student_kwargs', 'train_dir', 'unlabeled_dir', 'synthetic_size', 'image_size', 'demo_teacher_steps')
METRIC_KEYS = ('epoch', 'loss/customize', 'loss/feat_custom', 'loss/feat_general', 'loss/sup', 'loss/entropy',
               'acc/student', 'acc/teacher_custom', 'cka/student_vs_custom', 'cka/student_vs_teacher', 'rms/f_s',
               'rms/f_t_custom', 'time/customize_s', 'time/distill_s', 'time/eval_s', 'throughput/customize_img_s',
               'throughput/distill_img_s', 'throughput/eval_img_s', 'mem/peak_mb')
RUN = SimpleNamespace(rank=0, world=1, phase='setup')  # this process under torchrun; the phase errors are named by

class Abort(ValueError):
    """Abort(message[, exit code, default 2]): a failure the user can act on; `main` prints it as one line."""

def fail(msg, code=2):
    print(f"customkd: error: {f'[rank {RUN.rank}] ' if RUN.world > 1 else ''}{msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)

def num(kind, lo, hi, open_lo=False):
    """argparse type: an int or float in [lo, hi] ((lo, hi] with open_lo); NaN fails every comparison."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            v = math.nan
        if not ((v > lo if open_lo else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} in "
                                             f"{'(' if open_lo else '['}{lo}, {hi}], got {s!r}")
        return v
    return parse

def build_parser():
    p = argparse.ArgumentParser(description='CustomKD: customize a frozen foundation teacher to a student, then distil',
                                epilog=f"--dataset synthetic (the offline demo) sets {PRESETS['synthetic']}")
    p.error = fail  # one line, exit 2, instead of argparse's usage dump
    count, seed, side = num(int, 1, 10**6), num(int, 0, 2**31 - 1), num(int, 8, 1024)
    weight, rate = num(float, 0, 1000), num(float, 0, 10, open_lo=True)
    add = p.add_argument_group('data').add_argument
    add('--dataset', default='cifar100', choices=['cifar100', 'cifar10', 'synthetic', 'folder'],
        help='cifar100/cifar10 (downloaded to --data-dir), synthetic (generated offline), folder (class folders)')
    add('--data-dir', default='./data', help='where CIFAR lives or is downloaded to (default ./data)')
    add('--train-dir', help='folder dataset: class folders of training images (the labeled candidates)')
    add('--test-dir', help='folder dataset: class folders of test images, none of them a training image')
    add('--unlabeled-dir', help='folder dataset: class folders that are the unlabeled set instead (labels unread)')
    add('--labeled-list', help='folder dataset: file of training images, a name per line, labeled instead of --labels')
    add('--cache-dir', help='where folders are decoded once to uint8 arrays (default DATA_DIR/decoded)')
    add('--workers', type=num(int, 1, 1024), help='processes that decode a folder (default: all cores)')
    add('--image-size', type=side, help='side of stored synthetic/folder images (default 224)')
    add('--synthetic-size', type=num(int, 10, 10**6), help='synthetic: training images, test ones up to 1000 (1600)')
    add('--labels', help="labeled set: '10pct' of each class, '400' in all, or 'all' (default 10pct)")
    add('--split-seed', type=seed, default=0, help='seed of the labeled split (default 0)')
    add = p.add_argument_group('models (any timm name; the demo settings are below)').add_argument
    add('--teacher', help=f"frozen teacher (default {COMMON['teacher']})")
    add('--student', help=f"student (default {COMMON['student']})")
    add('--teacher-kwargs', help='JSON object of extra timm.create_model arguments for the teacher, e.g. {"depth": 2}')
    add('--student-kwargs', help='JSON object of extra timm.create_model arguments for the student')
    add('--teacher-res', type=side, help='teacher input side in pixels (default 224)')
    add('--student-res', type=side, help='student input side in pixels (default 224)')
    add('--pretrained', action=argparse.BooleanOptionalAction, help='hub weights (default on)')
    add('--teacher-weights', help='local teacher weight file, loaded by timm (position embeddings resized)')
    add('--student-weights', help='local student weight file, loaded by timm')
    add('--demo-teacher-steps', type=num(int, 0, 10**5), help='synthetic: demo teacher training steps (student: half)')
    add = p.add_argument_group('method (the loss weights and the two-stage schedule)').add_argument
    add('--w-custom', type=weight, default=1.0, help='weight of L_f~t = MSE(f_s, P_c(f_t)) (default 1)')
    add('--w-general', type=weight, default=1.0, help='weight of L_ft = MSE(P_g(f_s), f_t) (default 1)')
    add('--w-sup', type=weight, default=1.0, help='weight of the supervised CE on labeled images (default 1)')
    add('--w-ent', type=weight, default=1.0, help='weight of entropy minimisation on unlabeled images (default 1)')
    add('--custom-every', type=count, default=1, help="stage 1 every N epochs (default 1: the paper's best)")
    add('--custom-head', default='student', choices=['student', 'random'], help="head reading P_c(f_t) in stage 1")
    add = p.add_argument_group('optimisation (--batch-size and --mu are global, at any process count)').add_argument
    add('--epochs', type=count, help='epochs, each = stage 1 + stage 2 (default 30)')
    add('--batch-size', type=count, help='labeled images per step (default 64)')
    add('--mu', type=num(int, 1, 1000), help='unlabeled per labeled image in a step (default 7)')
    add('--lr', type=rate, help='SGD rate of student and P_g, cosine decay (default 0.01)')
    add('--lr-custom', type=rate, help='Adam learning rate of P_c (default 1e-3)')
    add('--weight-decay', type=num(float, 0, 1), default=5e-5, help='SGD weight decay (default 5e-5)')
    add = p.add_argument_group('speed').add_argument
    add('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    add('--precision', default='auto', choices=['auto', 'bf16', 'fp32'], help='bf16 autocast (auto: on CUDA only)')
    add('--teacher-cache', action='store_true', help='teacher features of every image and its flip, computed once')
    add('--compile', action='store_true', help='torch.compile the teacher and the student side')
    add('--deterministic', action='store_true', help='deterministic algorithms (slower on GPU)')
    add = p.add_argument_group('run').add_argument
    add('--seed', type=seed, default=0, help='seed of everything but the split (default 0)')
    add('--cka-samples', type=num(int, 0, 10**5), default=1000, help='test images for CKA; 0: off (default 1000)')
    add('--out-dir', help='run directory (default runs/DATASET-LABELS-seedSEED)')
    add = p.add_argument_group('run').add_mutually_exclusive_group().add_argument  # --resume or --overwrite
    add('--resume', action='store_true', help='continue the run in --out-dir from its checkpoint.pt')
    add('--overwrite', action='store_true', help='replace the outputs of an existing run directory')
    return p

def parse_args(argv=None):
    """Every flag checked before any work: numbers by the parser, here paths and combinations."""
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:  # a misspelled flag gets the nearest real one
        near = difflib.get_close_matches(unknown[0].split('=')[0].replace('_', '-'), p._option_string_actions, 1)
        p.error(f"unrecognized argument {unknown[0]!r}{f'; did you mean {near[0]}?' if near else ''}")
    defaults = {**COMMON, **PRESETS.get(args.dataset, {})}
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    flag = lambda k: '--' + k.replace('_', '-')  # noqa: E731
    for k in ('teacher_kwargs', 'student_kwargs'):  # JSON text -> dict, so that spacing never matters
        try:
            kwargs = json.loads(getattr(args, k)) if isinstance(getattr(args, k), str) else getattr(args, k)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            p.error(f'{flag(k)} must be a JSON object, got {getattr(args, k)!r}')
        setattr(args, k, kwargs)
    if args.dataset == 'folder' and not (args.train_dir and args.test_dir):
        p.error('--dataset folder needs --train-dir and --test-dir')
    for k in ('train_dir', 'test_dir', 'unlabeled_dir', 'labeled_list', 'demo_teacher_steps', 'synthetic_size'):
        only = 'folder' if k.endswith(('dir', 'list')) else 'synthetic'
        if args.dataset != only and getattr(args, k) != defaults.get(k):
            p.error(f'{flag(k)} is only for --dataset {only}')
    for k in ('train_dir', 'test_dir', 'unlabeled_dir', 'labeled_list', 'teacher_weights', 'student_weights'):
        path, folder = getattr(args, k), k.endswith('dir')
        if path is not None and not (os.path.isdir(path) if folder else os.path.isfile(path)):
            p.error(f"{flag(k)} {path!r} is not an existing {'folder' if folder else 'file'}")
    args.cache_dir = args.cache_dir or os.path.join(args.data_dir, 'decoded')
    args.out_dir = args.out_dir or os.path.join('runs', f'{args.dataset}-{args.labels}-seed{args.seed}')
    for k in ('data_dir', 'cache_dir', 'out_dir'):  # a folder that exists or can be made, and can be written
        up = os.path.abspath(getattr(args, k) or '/dev/null')
        while not os.path.exists(up):
            up = os.path.dirname(up)
        if not getattr(args, k) or not os.path.isdir(up) or not os.access(up, os.W_OK | os.X_OK):
            p.error(f'{flag(k)} {getattr(args, k)!r}: {up!r} is not a writable folder')
    parse_labels(args.labels)  # raises Abort on nonsense, before any work
    return args
# ================================================================ 4. data
def make_synthetic(y, size, num_classes, seed=0):
    """Images of classes y: per class a smooth colour pattern; images are shifted, jittered, noisy copies of it."""
    g = torch.Generator().manual_seed(seed)
    pad, n = size // 8, len(y)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=size + 2 * pad, mode='bicubic')
    rows, cols = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=g) + torch.arange(size)  # shifted crops
    x = protos[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None],
               cols[:, None, None, :]]
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)

def load_cifar(name, root, train):
    """CIFAR through torchvision; downloads when missing (unless HF_HUB_OFFLINE=1) and fails fast offline."""
    cls = torchvision.datasets.CIFAR100 if name == 'cifar100' else torchvision.datasets.CIFAR10
    offline, old = os.getenv('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'), socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an offline node fails in seconds, not minutes
    try:  # download=True first checks the files (and unpacks an archive already in root)
        ds = cls(root, train=train, download=not offline)
    except Exception as e:
        why = 'HF_HUB_OFFLINE=1 is set' if offline else f'{type(e).__name__}: {e}'
        raise Abort(f'{name} is not in --data-dir {root!r} and could not be downloaded ({why}); put {cls.filename} '
                    f'(or the extracted {cls.base_folder}/ folder) in a folder and point --data-dir there') from None
    finally:
        socket.setdefaulttimeout(old)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes

def list_folder(flag, root, classes=None):
    """ImageFolder layout -> (files, labels, class names), checked against `classes`; nothing is decoded here."""
    try:
        found, to_idx = torchvision.datasets.folder.find_classes(root)
        items = torchvision.datasets.folder.make_dataset(os.path.abspath(root), to_idx,
                                                         tuple(Image.registered_extensions()), allow_empty=True)
    except OSError as e:
        raise Abort(f'cannot read image folder {flag} {root!r}: {e}') from None
    if not items or classes is not None and found != classes:
        raise Abort(f'{flag} {root!r} holds no images' if not items else f'class folders differ between --train-dir '
                    f'and {flag}: only in one of them: {sorted(set(classes) ^ set(found))}')
    return [f for f, _ in items], [c for _, c in items], found

def decode(size, files):
    """DataLoader worker: files -> uint8 RGB (B, 3, size, size), shorter side resized, centre crop; the unreadable."""
    out, bad = torch.zeros(len(files), 3, size, size, dtype=torch.uint8), []
    for i, name in enumerate(files):
        try:
            with Image.open(name) as im:
                im.draft('RGB', (size, size))  # JPEG: decode at the smallest scale that is still >= size
                out[i] = TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert('RGB'), size), size))
        except Exception as e:
            bad.append(f'{name} ({type(e).__name__})')
    return out, bad

def decode_folder(files, args):
    """Image files -> uint8 (N, 3, S, S) mapped from an array file, decoded once and reused while files and S stay."""
    n, size = len(files), args.image_size
    key, nbytes = hashlib.sha1(json.dumps([files, size]).encode()).hexdigest()[:16], n * 3 * size * size
    path = os.path.join(args.cache_dir, f'{os.path.basename(os.path.dirname(os.path.dirname(files[0])))}-{size}px-'
                                        f'{key}.u8')
    while int(os.environ.get('LOCAL_RANK', 0)) > 0 and not (os.path.exists(path) and os.path.getsize(path) == nbytes):
        time.sleep(1)  # one process per machine decodes; the others wait for the file
    if not (os.path.exists(path) and os.path.getsize(path) == nbytes):  # new, or cut short (a full disk, a bad copy)
        os.makedirs(args.cache_dir, exist_ok=True)
        if nbytes > (free := shutil.disk_usage(args.cache_dir).free):  # now: a full disk mid-decode kills the process
            raise Abort(f'{n} images at {size} px need {nbytes / 1e9:.1f} GB in --cache-dir: {free / 1e9:.1f} GB free')
        tmp, bad = f'{path}.partial-{socket.gethostname()}-{os.getpid()}', []
        say(f'customkd: decoding {n} images to {size} px, once, into {path}')
        try:
            out = torch.from_file(tmp, shared=True, size=nbytes, dtype=torch.uint8).view(n, 3, size, size)
            loader = torch.utils.data.DataLoader(files, 256, num_workers=args.workers or len(os.sched_getaffinity(0)),
                                                 collate_fn=partial(decode, size))
            for i, (x, unreadable) in enumerate(progress(loader, f'decoding {os.path.basename(path)}', n, 256)):
                out[i * 256:i * 256 + len(x)], bad = x, bad + unreadable
            if bad:  # every one named: in the message when few, else in a file
                save_atomic(''.join(f'{b}\n' for b in bad), listed := os.path.join(args.cache_dir, 'unreadable.txt'))
                raise Abort(f"{len(bad)} image file(s) cannot be read: {', '.join(bad[:3])}{', ...' * (len(bad) > 3)} "
                            f"(all {len(bad)} listed in {listed}); remove or replace them")
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return torch.from_file(path, size=nbytes, dtype=torch.uint8).view(n, 3, size, size)

def load_data(args):
    """-> uint8 (N, 3, H, W) images and labels (folders: checked file lists, decoded once the models are built)."""
    if args.dataset == 'synthetic':  # + m images of other classes for the demo's pre-training (if it runs)
        n, c, m = args.synthetic_size, DEMO_CLASSES, DEMO_TEACHER_IMAGES if args.demo_teacher_steps else 0
        y = torch.cat([torch.arange(n + (n_test := min(n, 1000))) % c, c + torch.arange(m) % DEMO_TEACHER_CLASSES])
        x = make_synthetic(y, args.image_size, c + DEMO_TEACHER_CLASSES)
        return dict(train_x=x[:n], train_y=y[:n], test_x=x[n:n + n_test], test_y=y[n:n + n_test], n_labeled_pool=n,
                    classes=[str(k) for k in range(c)], teacher_x=x[n + n_test:], teacher_y=y[n + n_test:])
    if args.dataset.startswith('cifar'):
        (x, y, classes), (tx, ty, _) = (load_cifar(args.dataset, args.data_dir, t) for t in (True, False))
        return dict(train_x=x, train_y=y, test_x=tx, test_y=ty, classes=classes, n_labeled_pool=len(x))
    files, y, classes = list_folder('--train-dir', args.train_dir)
    names = [os.path.relpath(f, os.path.abspath(args.train_dir)) for f in files]
    if args.unlabeled_dir:  # the target domain, after the source; its labels are never read
        unlabeled = list_folder('--unlabeled-dir', args.unlabeled_dir, classes)[0]
        files, y = files + unlabeled, y + [-1] * len(unlabeled)
    test_files, test_y, _ = list_folder('--test-dir', args.test_dir, classes)
    train = {os.path.join(os.path.realpath(args.train_dir), name) for name in names}
    shared = [f for f in test_files if os.path.realpath(f) in train]
    if shared:
        raise Abort(f'--test-dir {args.test_dir!r} holds {len(shared)} of the --train-dir images (e.g. {shared[0]}); '
                    f'test images must not be training images')
    return dict(train_files=files, train_y=torch.tensor(y), test_files=test_files, test_y=torch.tensor(test_y),
                classes=classes, names=names, n_labeled_pool=len(names))

def parse_labels(spec):
    """'10pct' -> ('pct', 10.0); '400' -> ('count', 400); 'all' -> ('all', 1). Raises Abort on nonsense."""
    s = str(spec).strip().lower()
    try:
        kind, v = ('all', 1) if s == 'all' else ('pct', float(s[:-3])) if s.endswith('pct') else ('count', int(s))
        assert 0 < v and (kind != 'pct' or v <= 100)
        return kind, v
    except (ValueError, AssertionError):
        raise Abort(f"--labels {spec!r}: expected a percentage in (0, 100] ('10pct'), a count or 'all'") from None

def split_labeled(targets, labels, num_classes, seed):
    """Class-balanced split, own generator -> sorted long (labeled_idx, unlabeled_idx = all, as in FixMatch/USB)."""
    targets, (kind, v) = torch.as_tensor(targets).long(), parse_labels(labels)
    if kind == 'count' and v % num_classes:
        raise Abort(f'--labels {labels}: a count must divide evenly by the {num_classes} classes')
    g, chosen = torch.Generator().manual_seed(seed), []
    for c in range(num_classes):
        idx = (targets == c).nonzero().flatten()
        k = len(idx) if kind == 'all' else v // num_classes if kind == 'count' else round(len(idx) * v / 100)
        if k < 1 or k > len(idx):
            raise Abort(f'--labels {labels}: class {c} has {len(idx)} images, so it would get {k} labeled ones')
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values, torch.arange(len(targets))

def read_labeled_list(path, names):
    """--labeled-list: training images by file name (as the published ImageNet subsets) or class/file -> indices."""
    where = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):  # a bare file name, unless two folders hold one of that name
        base = os.path.basename(name)
        where[base] = None if where.get(base, i) != i else i
    with open(path, errors='replace') as f:
        wanted = [line.strip() for line in f if line.strip()]
    missing = [w for w in wanted if where.get(w) is None]
    if missing or not wanted:
        raise Abort(f'--labeled-list {path}: ' + (f'{len(missing)} name(s) are not in --train-dir or are ambiguous, '
                                                   f'e.g. {missing[0]!r}' if missing else 'no names in it'))
    return torch.tensor(sorted({where[w] for w in wanted}))

def plan_generator(kd, epoch, stage):
    """Each stage's data plan hangs on (seed, epoch, stage) alone: resuming needs no generator state."""
    key = hashlib.sha256(f'{kd.args.seed}/{epoch}/{stage}'.encode()).digest()  # torch seeds keep 32 bits only
    return torch.Generator().manual_seed(int.from_bytes(key[:4], 'little'))

def epoch_plan(idx, batch, steps, gen, pad):
    """(steps, batch, 4) long: id, crop offsets (0..2*pad), flip; from `gen` alone, whatever the device or processes."""
    n = steps * batch
    ids = torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(max(1, math.ceil(n / len(idx))))])[:n]
    crop = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    return torch.cat([ids[:, None], crop, torch.randint(0, 2, (n, 1), generator=gen)], 1).view(steps, batch, 4)

def fetch(src, rows, device):
    """src[rows] on device, gathered where src lives; from the host through pinned memory (an asynchronous copy)."""
    out = src[rows.to(src.device, non_blocking=True)]
    return (out.pin_memory() if device.type == 'cuda' and out.device.type == 'cpu' else out).to(device,
                                                                                                 non_blocking=True)

def augment(pool, plan, device):
    """Planned images, reflect-padded by 1/8 of the side (4 px at 32 px), cropped, flipped: float [0, 255] on device."""
    x = fetch(pool, plan[:, 0], device)
    B, _, H, W = x.shape
    pad = H // 8
    x = F.pad(x.float(), (pad, pad, pad, pad), mode='reflect')                  # (B, 3, H+2p, W+2p)
    dy, dx, flip = plan[:, 1:].to(device).T[..., None]                           # (B, 1) each
    rows, cols = dy + torch.arange(H, device=device), dx + torch.arange(W, device=device)    # (B, H), (B, W)
    cols = torch.where(flip.bool(), cols.flip(1), cols)
    b, c = torch.arange(B, device=device)[:, None, None, None], torch.arange(3, device=device)[None, :, None, None]
    return x[b, c, rows[:, None, :, None], cols[:, None, None, :]]

def model_view(model, res, device, channels_last):
    """The input one model sees: resized to its own size, normalised with its own mean/std (its timm config)."""
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(cfg[k], device=device).view(1, 3, 1, 1) * 255 for k in ('mean', 'std'))
    def view(x):  # float (B, 3, H, W) in [0, 255] -> normalised (B, 3, res, res)
        if x.shape[-1] != res:
            x = F.interpolate(x, size=(res, res), mode='bilinear', align_corners=False, antialias=x.shape[-1] > res)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    return view

def fits(nbytes, device):
    """Whether nbytes fit in 40 % of a GPU's free memory. On a CPU, data stay where they are (mapped files too)."""
    return device.type == 'cuda' and nbytes <= 0.4 * torch.cuda.mem_get_info(device)[0]
# ================================================================ 5. models
def create_model(args, role, num_classes):
    """The --teacher or --student timm model (hub or file weights, or random; ViTs built for their res)."""
    name, res, weights, kwargs = (getattr(args, role + k) for k in ('', '_res', '_weights', '_kwargs'))
    if not timm.is_model(name):
        raise Abort(f"--{role}: unknown timm model {name!r} (list them with timm.list_models('*pattern*'))")
    overlay = dict(pretrained_cfg_overlay=dict(file=weights, source='timm')) if weights else {}
    try:  # a keyword argument that this file sets itself (num_classes, pretrained, ...) is a TypeError here
        kw = dict(num_classes=num_classes, pretrained=args.pretrained or bool(weights), **overlay, **kwargs)
        try:
            return timm.create_model(name, img_size=res, **kw)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
            return timm.create_model(name, **kw)
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if isinstance(e, TypeError) or not (weights or args.pretrained):
            raise Abort(f'--{role} {name} with --{role}-kwargs {json.dumps(kwargs)}: {why}') from None
        if weights:
            raise Abort(f'--{role}-weights {weights}: timm cannot load it ({why})') from None
        raise Abort(f'could not load pretrained weights for {name} ({type(e).__name__}): offline? use --no-pretrained, '
                    f'local files (--teacher-weights/--student-weights), or HF_HUB_OFFLINE=1 with a filled hub cache') \
            from None

def features(model, x):
    """Pooled pre-logits feature of any timm-style model: (B, d)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)

class StudentSide(nn.Module):
    """S with its head h and P_g as one module, so that one DDP wrapper averages all their gradients."""
    def __init__(self, student, proj_general):
        super().__init__()
        self.student, self.proj_general = student, proj_general
    def forward(self, x):  # -> f_s (B, d_s), h(f_s) (B, C), P_g(f_s) (B, d_t) or None
        f_s = features(self.student, x)
        return f_s, self.student.get_classifier()(f_s), self.proj_general(f_s) if self.proj_general else None

def build(kd, num_classes, teacher=None, student=None):
    """Models (the teacher if a feature loss needs it), projectors, views and the DDP-wrapped, compiled forwards."""
    args, device, use_teacher = kd.args, kd.device, kd.args.w_custom > 0 or kd.args.w_general > 0
    with torch.random.fork_rng(devices=[]):  # the demo's models are one fixed pair, as downloaded weights would be
        torch.manual_seed(0 if args.demo_teacher_steps else args.seed)
        student = student if student is not None else create_model(args, 'student', num_classes)
        teacher = teacher if teacher is not None or not use_teacher else create_model(args, 'teacher', 0)
    fmt = dict(memory_format=torch.channels_last) if kd.bf16 else {}  # channels_last follows the precision switch
    for role, model in (('student', student), ('teacher', teacher))[:1 + use_teacher]:
        need = ('forward_features', 'forward_head', 'get_classifier')[:3 if role == 'student' else 2]
        if not all(callable(getattr(model, m, None)) for m in need):
            raise Abort(f"--{role} {type(model).__name__} has no {', '.join(m for m in need if not hasattr(model, m))}"
                        f": a {role} needs {', '.join(need)} (forward_head(x, pre_logits=True): the pooled feature)")
        res = getattr(args, f'{role}_res')
        setattr(kd, f'view_{role[0]}', model_view(model, res, device, kd.bf16))                # view_s, view_t
        try:  # shapes from a dummy forward, in eval mode so BatchNorm statistics stay untouched
            with torch.no_grad():
                x = torch.zeros(1, 3, res, res, device=device)
                setattr(kd, f'd_{role[0]}', features(model.to(device, **fmt).eval(), x).shape[1])    # d_s, d_t
        except Exception as e:
            raise Abort(f"--{role} cannot take --{role}-res {res}: {(str(e).splitlines() or [''])[0]}") from None
    kd.student = student
    if kd.head(torch.zeros(1, kd.d_s, device=device)).shape[-1] != num_classes:
        raise Abort(f'the student head must output {num_classes} classes')
    compiled = torch.compile if args.compile else (lambda f: f)
    if use_teacher:
        kd.teacher = teacher.eval().requires_grad_(False)                                    # frozen, always
        kd.feat_t = compiled(partial(features, teacher))                                     # f_t = T(x)
    make_projectors(kd, num_classes)
    ddp = partial(nn.parallel.DistributedDataParallel, forward_sync_buffers=False) if RUN.world > 1 else (lambda m: m)
    if kd.proj_custom is not None:
        set_stage(kd, 1)  # DDP averages the gradients of what requires grad when it is built
        kd.customizer = ddp(nn.Sequential(kd.proj_custom, kd.head_c))                        # f_t -> h(P_c(f_t))
    set_stage(kd, 2)
    kd.student_side = compiled(ddp(StudentSide(student, kd.proj_general)))

def pretrain_demo_models(kd, x, y, steps, own=()):
    """Demo only: the teacher (`steps`) and the student (half) first learn other classes through a temporary linear
    head (Adam at lr 1e-3 and 3e-3, batches of 64), as a foundation model and an ImageNet student; `own`: as given."""
    RUN.phase, models = 'model', [(kd.teacher, kd.view_t, kd.d_t, steps, 0, 1e-3)] if kd.teacher is not None else []
    say(f'customkd: pre-training the demo models on {len(x)} images of other classes (a fixed pair, whatever --seed)')
    for model, view, d, n, s, lr in models + [(kd.student, kd.view_s, kd.d_s, steps // 2, 1, 3e-3)]:
        if any(model is m for m in own):
            continue
        with torch.random.fork_rng(devices=[]):  # the same demo models whichever projectors were built before
            torch.manual_seed(s)
            head = nn.Linear(d, int(y.max() - y.min()) + 1).to(kd.device)
        opt = torch.optim.Adam([*model.train().requires_grad_(True).parameters(), *head.parameters()], lr=lr)
        for plan in epoch_plan(torch.arange(len(x)), 64, n, torch.Generator().manual_seed(s), x.shape[-1] // 8):
            with kd.amp():
                logits = head(features(model, view(augment(x, plan, kd.device))))
            take_step(opt, F.cross_entropy(logits.float(), (y[plan[:, 0]] - y.min()).to(kd.device)))
        for p in model.parameters() if RUN.world > 1 else []:  # every rank keeps rank 0's (GPU kernels may differ)
            dist.broadcast(p.data, 0)
    set_stage(kd, 2)  # the teacher frozen from now on

def teacher_features(kd, plan=None, x=None):
    """f_t (B, d_t) from --teacher-cache (the plan's flip picks the view), else T(x or the plan's images)."""
    if kd.cache_train is not None and plan is not None:
        return fetch(kd.cache_train, plan[:, 0] * 2 + plan[:, 3], kd.device).float()
    with torch.inference_mode(), kd.amp():
        f_t = kd.feat_t(kd.view_t(augment(kd.x_pool, plan, kd.device) if x is None else x))
    return f_t.clone()  # a normal tensor again, so that autograd may save it

def build_teacher_cache(kd, with_train):
    """Teacher features, once, over the processes: test images; with --teacher-cache training images and flips."""
    dtype, t = torch.bfloat16 if kd.bf16 else torch.float32, clock(kd.device)
    say(f"customkd: teacher features of {len(kd.x_test)} test images{' and of the training images' * with_train}")
    def rows(x, views, i, j):  # -> (j - i, views, d_t)
        v = x[i:j].to(kd.device).float()
        return torch.stack([teacher_features(kd, x=v.flip(-1) if flip else v) for flip in range(views)], 1).to(dtype)
    for name, x, views in [('cache_test', kd.x_test, 1)] + [('cache_train', kd.x_pool, 2)] * with_train:
        place = kd.device if fits(len(x) * views * kd.d_t * dtype.itemsize, kd.device) else torch.device('cpu')
        out = sharded_rows(len(x), kd.batch_eval, partial(rows, x, views), kd.device, place, f'teacher ({name})')
        setattr(kd, name, out.flatten(0, 1))                                  # (N_test, d_t) and (2 N, d_t)
    kd.time_cache = clock(kd.device) - t
# ================================================================ 6. several processes (torchrun)
def init_process(args):
    """torchrun sets WORLD_SIZE, RANK, LOCAL_RANK: one process per GPU (NCCL) or per CPU share (gloo). -> device"""
    RUN.world, RUN.rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    cuda = args.device != 'cpu' and torch.cuda.is_available()
    if args.device == 'cuda' and not cuda:
        raise Abort(f'--device cuda, but this torch {torch.__version__} sees no CUDA device; use --device cpu')
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else 'cpu')
    if RUN.world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if cuda else 'gloo')
    return device

def shard(t):
    """This process's equal share of a global batch (dim 0): together they see what one process would."""
    k = len(t) // RUN.world
    return t[RUN.rank * k:(RUN.rank + 1) * k]

def global_batch(batch, n):
    """The global batch: at most the n images, split evenly over the processes."""
    if min(batch, n) < RUN.world:
        raise Abort(f'a batch of {min(batch, n)} images cannot be split over {RUN.world} processes')
    return min(batch, n) // RUN.world * RUN.world

def all_reduce(t, op=dist.ReduceOp.SUM):
    if RUN.world > 1:
        dist.all_reduce(t, op=op)
    return t

def average_buffers(model):
    """BatchNorm running statistics: kept per process within an epoch, averaged over the processes at its end."""
    for b in [b for b in model.buffers() if b.is_floating_point()] if RUN.world > 1 else []:
        b.copy_(all_reduce(b.clone()) / RUN.world)

def sharded_rows(n, batch, fn, device, out_device, what):
    """fn(i, j) -> rows i:j of an (n, ...) result: each process computes its own shard, then all gather all n rows."""
    m = math.ceil(n / RUN.world)
    lo, hi = min(n, RUN.rank * m), min(n, RUN.rank * m + m)
    local = torch.cat([fn(i, min(i + batch, hi)).to(out_device) for i in progress(range(lo, hi, batch), what, hi - lo,
                                                                                    batch)])
    if RUN.world == 1:
        return local
    parts = [torch.empty(m, *local.shape[1:], dtype=local.dtype, device=device) for _ in range(RUN.world)]
    dist.all_gather(parts, torch.cat([local, local.new_zeros(m - len(local), *local.shape[1:])]).to(device))
    return torch.cat([part.to(out_device) for part in parts])[:n]
# ================================================================ 7. bookkeeping: set-up, logs, checkpoints, errors
def setup(args, teacher=None, student=None):
    """Everything before the first epoch: processes, data, models, projectors, split, optimizers, run folder, cache."""
    kd = Run(args, device=(device := init_process(args)))
    args.teacher, args.student = (type(m).__name__ if m is not None else n  # your own modules: their class name
                                  for m, n in ((teacher, args.teacher), (student, args.student)))
    ckpt = load_checkpoint(args) if args.resume else None
    if RUN.rank == 0 and not args.resume and os.path.isdir(args.out_dir) and os.listdir(args.out_dir) \
            and not args.overwrite:
        raise Abort(f'run directory {args.out_dir} exists: --resume continues it, --overwrite replaces it')
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA lacks a few kernels
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.manual_seed(args.seed)
    RUN.phase = 'data'  # CIFAR and the demo load in seconds; folders are listed and checked now, decoded below
    data = load_data(args)
    RUN.phase, num_classes = 'model', len(data['classes'])
    build(kd, num_classes, teacher, student)
    RUN.phase, n_pool = 'data', data['n_labeled_pool']
    for k in ('train', 'test') if args.dataset == 'folder' else ():  # after the models, so that their errors come first
        data[f'{k}_x'] = decode_folder(data[f'{k}_files'], args)
    kd.labeled_idx = read_labeled_list(args.labeled_list, data['names']) if args.labeled_list else \
        split_labeled(data['train_y'][:n_pool], args.labels, num_classes, args.split_seed)[0]
    kd.unlabeled_idx = torch.arange(n_pool if n_pool < len(data['train_x']) else 0, len(data['train_x']))
    if ckpt is not None and not torch.equal(ckpt['labeled_idx'], kd.labeled_idx):
        raise Abort("--resume: the labeled split differs from the checkpoint's (different data?)")
    kd.x_pool, kd.x_test = (x.to(device) if fits(x.numel(), device) else x for x in (data['train_x'], data['test_x']))
    kd.y_pool, kd.y_test = data['train_y'].to(device), data['test_y'].to(device)
    if args.demo_teacher_steps:
        pretrain_demo_models(kd, data['teacher_x'], data['teacher_y'], args.demo_teacher_steps, (teacher, student))
    params = list(kd.student.parameters()) + (list(kd.proj_general.parameters()) if kd.proj_general else [])
    kd.opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    kd.opt_custom = torch.optim.Adam(kd.proj_custom.parameters(), lr=args.lr_custom) if kd.proj_custom else None
    if ckpt is not None:
        for key in (k for k in PARTS if getattr(kd, k) is not None):
            getattr(kd, key).load_state_dict(ckpt[key])
        kd.history, kd.t_start = ckpt['history'], kd.t_start - ckpt['wall_time_s']
        torch.set_rng_state(ckpt['rng_cpu'])
        if device.type == 'cuda' and ckpt['rng_cuda']:
            torch.cuda.set_rng_state_all(ckpt['rng_cuda'])
    RUN.phase = 'saving'
    if RUN.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        save_atomic(json.dumps(vars(args), indent=2) + '\n', out_file(args, 'args.json'))
        save_atomic(''.join(json.dumps(row) + '\n' for row in kd.history), out_file(args, 'metrics.jsonl'))
        for name in ('summary.json', 'features.pt') + (() if args.resume else ('checkpoint.pt', 'student.pt')):
            if os.path.exists(out_file(args, name)):  # --overwrite: nothing of the old run survives
                os.remove(out_file(args, name))
    RUN.phase = 'teacher cache'
    if kd.teacher is not None:  # test features always (the teacher is frozen); train features with --teacher-cache
        build_teacher_cache(kd, args.teacher_cache)
    say(f"customkd: {args.dataset} {num_classes} classes, {len(kd.labeled_idx)} labeled / {len(kd.unlabeled_idx)} "
        f"unlabeled / {len(kd.x_test)} test | {args.student} <- {args.teacher if kd.teacher else 'no teacher'} | "
        f"{device.type} x {RUN.world}, {'bf16' if kd.bf16 else 'fp32'} | teacher features in {kd.time_cache:.1f}s")
    return kd

def timed(kd, row, key, fn, *a):
    """One phase of an epoch ('customize', 'distill' or 'eval'): its metrics, seconds and images/s go into row."""
    RUN.phase, t = key, clock(kd.device)
    metrics, n_img = fn(kd, *a)
    row.update(metrics, **{f'time/{key}_s': clock(kd.device) - t})
    row[f'throughput/{key}_img_s'] = n_img / row[f'time/{key}_s']

def epoch_means(kd, epoch, log):
    """Means of a stage's loss terms over steps and processes; a non-finite term stops the run, the first named."""
    terms = {k: all_reduce(torch.stack([step[k].float() for step in log])) / RUN.world for k in log[0]}  # (steps,)
    first = {k: int((~v.isfinite()).nonzero()[0]) if not v.isfinite().all() else len(log) for k, v in terms.items()}
    culprits = [k for k, s in first.items() if s == min(first.values()) < len(log)]
    if culprits:
        kept = f'the checkpoint of epoch {epoch} in {kd.args.out_dir} is kept' if epoch else 'no checkpoint was written'
        raise Abort(f"{' and '.join(culprits)} became non-finite in epoch {epoch + 1}; stopped; {kept} (lower --lr "
                    f"or that loss weight{', then --resume' if epoch else ''})", 3)
    return {k: v.mean().item() for k, v in terms.items()}

def save_epoch(kd, row):
    """The epoch's row, an atomic checkpoint and the deployable student (rank 0 writes)."""
    RUN.phase = 'saving'
    if kd.device.type == 'cuda':  # the epoch's peak CUDA allocations
        row['mem/peak_mb'] = torch.cuda.max_memory_allocated(kd.device) / 2**20
        torch.cuda.reset_peak_memory_stats(kd.device)
    else:  # the process's peak RSS so far (Linux: KiB)
        row['mem/peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kd.history.append(row)
    if RUN.rank == 0:
        state = {k: getattr(kd, k).state_dict() if getattr(kd, k) is not None else {} for k in PARTS}
        save_atomic(dict(identity={k: getattr(kd.args, k) for k in IDENTITY}, epoch=row['epoch'], history=kd.history,
                         labeled_idx=kd.labeled_idx, wall_time_s=time.time() - kd.t_start, **state,
                         rng_cpu=torch.get_rng_state(),
                         rng_cuda=torch.cuda.get_rng_state_all() if kd.device.type == 'cuda' else []),
                    out_file(kd.args, 'checkpoint.pt'))
        save_atomic(dict(state_dict=kd.student.state_dict(), model=kd.args.student, num_classes=len(kd.head.weight)),
                    out_file(kd.args, 'student.pt'))
        save_atomic(''.join(json.dumps(h) + '\n' for h in kd.history), out_file(kd.args, 'metrics.jsonl'))
    say(console_line(row, kd.args.epochs))

def summarise(kd):
    RUN.phase, h = 'saving', kd.history  # never empty: --epochs >= 1, and a checkpoint holds an epoch at least
    summary = dict(acc_student_last=h[-1]['acc/student'], acc_student_best=max(row['acc/student'] for row in h),
                   acc_teacher_custom_last=h[-1]['acc/teacher_custom'], epochs=len(h), num_labeled=len(kd.labeled_idx),
                   num_unlabeled=len(kd.unlabeled_idx), num_train_images=len(kd.x_pool), world_size=RUN.world,
                   wall_time_s=time.time() - kd.t_start, **{'time/teacher_cache_s': kd.time_cache},
                   **{k: sum(row[k] or 0 for row in h) for k in ('time/customize_s', 'time/distill_s', 'time/eval_s')},
                   **{'mem/peak_mb': max(row['mem/peak_mb'] for row in h)}, args=vars(kd.args))
    if RUN.rank == 0:
        save_atomic(kd.sample, out_file(kd.args, 'features.pt'))  # f_s, f_t, f_t_custom, y: CKA's sample
        save_atomic(json.dumps(summary, indent=2) + '\n', out_file(kd.args, 'summary.json'))
    say(f"customkd: last-epoch student accuracy {summary['acc_student_last']:.4f} (best epoch: "
        f"{summary['acc_student_best']:.4f}); wall {summary['wall_time_s']:.0f}s; outputs in {kd.args.out_dir}")
    return summary

def save_atomic(obj, path):
    """Serialise in memory, write a temporary file, fsync, rename: a crash or a full disk never breaks `path`."""
    data = io.BytesIO(obj.encode() if isinstance(obj, str) else b'')
    if not isinstance(obj, str):
        torch.save(obj, data)
    try:
        with open(f'{path}.tmp', 'wb') as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(f'{path}.tmp', path)
    except BaseException as e:
        if os.path.exists(f'{path}.tmp'):
            os.remove(f'{path}.tmp')
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20
            raise Abort(f'--out-dir {os.path.dirname(path)} is full ({free:.0f} MB free) writing '
                        f'{os.path.basename(path)}; any checkpoint.pt is intact: free space, then --resume') from None
        raise

def out_file(args, name):
    return os.path.join(args.out_dir, name)

def load_checkpoint(args):
    """Load with weights_only=True (never runs pickled code) and refuse a checkpoint of another run."""
    path = out_file(args, 'checkpoint.pt')
    try:  # a missing file too
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert isinstance(ckpt, dict) and 'identity' in ckpt
    except Exception as e:
        raise Abort(f'--resume: no readable CustomKD checkpoint at {path} ({type(e).__name__})') from None
    for k, v in ((k, getattr(args, k)) for k in IDENTITY):  # what a run is: data, split, models
        if ckpt['identity'].get(k) != v:
            raise Abort(f"--resume: {path} was written with --{k.replace('_', '-')} {ckpt['identity'].get(k)}, "
                        f'not {v}; use the original value or another --out-dir')
    return ckpt

def console_line(row, epochs):
    """One aligned line per epoch: losses by their paper symbols, accuracies, CKA, stage-2 time and speed."""
    v = lambda k, f: format(row[k], f) if row[k] is not None else '-'.rjust(len(format(0.0, f)))  # noqa: E731
    return (f"epoch {row['epoch']:3d}/{epochs} | L_cust {v('loss/customize', '6.3f')} | L_f~t "
            f"{v('loss/feat_custom', '7.4f')} L_ft {v('loss/feat_general', '7.4f')} L_L {v('loss/sup', '6.3f')} L_U "
            f"{v('loss/entropy', '6.3f')} | acc {v('acc/student', '.4f')} teacher_custom "
            f"{v('acc/teacher_custom', '.4f')} | cka f~t {v('cka/student_vs_custom', '.3f')} f_t "
            f"{v('cka/student_vs_teacher', '.3f')} | {v('time/distill_s', '6.1f')}s "
            f"{v('throughput/distill_img_s', '6.0f')} img/s {v('mem/peak_mb', '6.0f')} MB")

def say(line):
    if RUN.rank == 0:
        print(line, flush=True)

def clock(device):
    """Seconds, after the device has finished its queued work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()

def progress(items, what, total, per=1):
    """Yield items; once a minute, rank 0 prints done/total, rate and time left."""
    t0 = shown = time.time()
    for i, item in enumerate(items, 1):
        yield item
        now, done = time.time(), min(i * per, total)
        if RUN.rank == 0 and now - shown > 60:
            shown, rate = now, done / (now - t0)
            print(f'{what}: {done}/{total}, {rate:.0f}/s, {(total - done) / rate:.0f} s left', file=sys.stderr)

def main(argv=None, teacher=None, student=None):
    """Run the CLI and return the summary dict. `teacher`/`student`: your own built modules (README)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends a run as Ctrl-C does
    RUN.phase = 'setup'
    try:
        out = run(parse_args(argv), teacher, student)
        if dist.is_initialized():
            dist.destroy_process_group()
        return out
    except Abort as e:
        fail(*e.args)
    except KeyboardInterrupt:
        if RUN.rank > 0:
            raise SystemExit(130)
        fail('interrupted (Ctrl-C, SIGTERM, or a failed torchrun process); checkpoint.pt is intact: add --resume', 130)
    except Exception as e:
        if os.environ.get('CUSTOMKD_DEBUG', '') not in ('', '0'):
            raise
        hint = {'data': 'check the dataset files, --data-dir and --cache-dir', 'model': 'check --teacher/--student',
                'saving': 'check --out-dir'}.get(RUN.phase, 'out of memory? lower --batch-size; else --precision fp32')
        fail(f"unexpected {type(e).__name__} during {RUN.phase}: {' '.join(str(e).split())[:300]}; {hint}; "
             f'CUSTOMKD_DEBUG=1 shows the traceback', 1)
    finally:
        signal.signal(signal.SIGTERM, previous)

if __name__ == '__main__':
    main()
