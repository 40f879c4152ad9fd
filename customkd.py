"""CustomKD in one file: customize a frozen vision foundation model to an edge student, then distil.

Paper: J. Lee, D. Das, M. Hayat, S. Choi, K. Hwang, F. Porikli, "CustomKD: Customizing Large Vision
Foundation for Edge Model Improvement via Knowledge Distillation", CVPR 2025, arXiv:2503.18244.

Every epoch runs two stages (paper Fig. 2; the lines that *are* the method are tagged `# [CustomKD]`):
  1. feature customization: teacher T and the student's classifier head h frozen; train only the
     projector P_c so that h reads the customized teacher feature correctly: CE(h(P_c(T(x))), y).
  2. distillation: T and P_c frozen; train the student S, h and the projector P_g with
     w_custom*MSE(S(x), P_c(T(x))) + w_general*MSE(P_g(S(x)), T(x)) + w_sup*CE + w_ent*entropy.

Commands
  pip install -r requirements.txt
  python customkd.py --dataset cifar100 --labels 10pct              # the main job (GPU + internet)
  python customkd.py --dataset synthetic                            # offline CPU demo, tiny models
  HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py             # the tests (CPU, no network)

Measured (2-core x86-64 CPU, no GPU; torch 2.14.1, timm 1.0.31; seed 0 and split seed 0; one run):
  the offline demo reaches last-epoch student accuracy 0.9325 (best epoch 0.9325) in 5 epochs, 38-42 s
  wall; the supervised + entropy baseline (--w-custom 0 --w-general 0) 0.4100. CIFAR-100 on a GPU:
  not yet measured. README.md has the tables, the commands and what each number does not show.
"""
import argparse
import copy
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import urllib.parse
from functools import partial
from types import SimpleNamespace

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# ================================================================ configuration
# Defaults that differ by dataset; a flag given on the command line always wins.
COMMON = dict(teacher='vit_large_patch14_dinov2.lvd142m', student='mobilenetv3_large_100.ra_in1k',
              teacher_kwargs='{}', student_kwargs='{}', teacher_res=224, student_res=224,
              pretrained=True, epochs=30, lr=0.01, batch_size=64, mu=7, image_size=224)
PRESETS = {'synthetic': dict(teacher='vit_tiny_patch16_224', teacher_kwargs='{"depth": 2, "patch_size": 8}',
                             student='mobilenetv3_small_050', teacher_res=32, student_res=32, pretrained=False,
                             epochs=5, lr=0.02, batch_size=16, mu=3, image_size=32)}
# Flags that define a run: --resume refuses a checkpoint written with other values.
IDENTITY = ('dataset', 'labels', 'split_seed', 'teacher', 'student', 'teacher_kwargs', 'student_kwargs',
            'train_dir', 'unlabeled_dir', 'synthetic_size', 'image_size')
METRIC_KEYS = ('epoch', 'loss/customize', 'loss/feat_custom', 'loss/feat_general', 'loss/sup', 'loss/entropy', 'acc/student',
               'acc/teacher_custom', 'cka/student_vs_custom', 'cka/student_vs_teacher', 'time/customize_s', 'time/distill_s',
               'time/eval_s', 'throughput/customize_img_s', 'throughput/distill_img_s', 'mem/peak_mb')


class Abort(ValueError):
    """A failure the user can act on: `main` prints it as one line and exits with `code`."""
    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code


def fail(msg, code=2):
    print(f'customkd: error: {msg}', file=sys.stderr)
    raise SystemExit(code)


def build_parser():
    p = argparse.ArgumentParser(description='CustomKD: customize a frozen foundation teacher to a student, then distil.')
    p.error = fail  # one line, exit 2, instead of argparse's usage dump
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='cifar100', choices=['cifar100', 'cifar10', 'synthetic', 'folder'],
                   help='cifar100/cifar10 (downloaded to --data-dir), synthetic (generated offline), folder (class folders)')
    g.add_argument('--data-dir', default='./data', help='where CIFAR lives or is downloaded to (default ./data)')
    g.add_argument('--train-dir', help='folder dataset: class folders of training images (the labeled candidates)')
    g.add_argument('--test-dir', help='folder dataset: class folders of test images')
    g.add_argument('--unlabeled-dir', help='folder dataset: class folders that replace --train-dir as the unlabeled set '
                   '(domain adaptation: its labels are never read)')
    g.add_argument('--image-size', type=int, help='size synthetic/folder images are stored at (default 224; synthetic 32)')
    g.add_argument('--synthetic-size', type=int, default=1600, help='synthetic: training images, plus a quarter as many test images (default 1600)')
    g.add_argument('--labels', default='10pct', help="labeled set: per-class percentage ('10pct'), total count divisible "
                   "by the class count ('400'), or 'all' (default 10pct)")
    g.add_argument('--split-seed', type=int, default=0, help='seed of the labeled split, independent of --seed (default 0)')
    g = p.add_argument_group('models (any timm name)')
    g.add_argument('--teacher', help=f"frozen teacher (default {COMMON['teacher']}; synthetic: 2-block ViT-Tiny)")
    g.add_argument('--student', help=f"student (default {COMMON['student']}; synthetic: mobilenetv3_small_050)")
    g.add_argument('--teacher-kwargs', help='JSON of extra timm.create_model arguments for the teacher, e.g. {"depth": 2}')
    g.add_argument('--student-kwargs', help='JSON of extra timm.create_model arguments for the student')
    g.add_argument('--teacher-res', type=int, help='teacher input size in pixels (default 224; synthetic 32)')
    g.add_argument('--student-res', type=int, help='student input size in pixels (default 224; synthetic 32)')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction,
                   help='pretrained weights from the Hugging Face hub (default on; synthetic off); --no-pretrained: random')
    g.add_argument('--teacher-weights', help='local teacher weight file, loaded by timm (position embeddings resized)')
    g.add_argument('--student-weights', help='local student weight file, loaded by timm')
    g.add_argument('--proj-act', default='auto', choices=['auto', 'none'],
                   help="end P_c with the student's final activation when f_s comes out of one (auto), or not (none)")
    g = p.add_argument_group('method (the loss weights and the two-stage schedule)')
    g.add_argument('--w-custom', type=float, default=1.0, help='weight of L_f~t = MSE(f_s, P_c(f_t)) (default 1)')
    g.add_argument('--w-general', type=float, default=1.0, help='weight of L_ft = MSE(P_g(f_s), f_t) (default 1)')
    g.add_argument('--w-sup', type=float, default=1.0, help='weight of the supervised CE on labeled images (default 1)')
    g.add_argument('--w-ent', type=float, default=1.0, help='weight of entropy minimisation on unlabeled images (default 1)')
    g.add_argument('--custom-every', type=int, default=1, help="run stage 1 every N epochs (default 1, the paper's best)")
    g.add_argument('--custom-head', default='student', choices=['student', 'random'],
                   help="head reading P_c(f_t) in stage 1: the student's own (CustomKD) or a frozen random one (ablation)")
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, help='epochs, each = stage 1 + stage 2 (default 30; synthetic 5)')
    g.add_argument('--batch-size', type=int, help='labeled images per step (default 64; synthetic 16)')
    g.add_argument('--mu', type=int, help='unlabeled images per labeled image in a stage-2 step (default 7; synthetic 3)')
    g.add_argument('--lr', type=float, help='SGD learning rate of student and P_g, cosine decay (default 0.01; synthetic 0.02)')
    g.add_argument('--lr-custom', type=float, default=1e-3, help='Adam learning rate of P_c (default 1e-3)')
    g.add_argument('--weight-decay', type=float, default=5e-5, help='SGD weight decay (default 5e-5)')
    g = p.add_argument_group('speed')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available (default)')
    g.add_argument('--teacher-cache', action='store_true', help='teacher features computed once per image (plain and '
                   'flipped view) and reused in both stages')
    g.add_argument('--compile', action='store_true', help='torch.compile the teacher and student feature functions')
    g.add_argument('--deterministic', action='store_true', help='deterministic algorithms (exact resume; slower on GPU)')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0, help='seed of everything except the labeled split (default 0)')
    g.add_argument('--eval-every', type=int, default=1, help='evaluate every N epochs and at the last (default 1)')
    g.add_argument('--cka-samples', type=int, default=1000, help='test images for the CKA diagnostic; 0: off (default 1000)')
    g.add_argument('--out-dir', help='run directory (default runs/DATASET-LABELS-seedSEED)')
    g.add_argument('--resume', action='store_true', help='continue the run in --out-dir from its checkpoint.pt')
    g.add_argument('--overwrite', action='store_true', help='replace the outputs of an existing run directory')
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    vars(args).update({k: v for k, v in {**COMMON, **PRESETS.get(args.dataset, {})}.items() if getattr(args, k) is None})
    for k in ('epochs', 'batch_size', 'mu', 'lr', 'lr_custom', 'custom_every', 'eval_every', 'teacher_res', 'student_res',
              'image_size', 'synthetic_size'):
        if not getattr(args, k) > 0:  # also rejects NaN
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if min(args.w_custom, args.w_general, args.w_sup, args.w_ent, args.weight_decay, args.cka_samples) < 0:
        p.error('loss weights, --weight-decay and --cka-samples must not be negative')
    for k in ('teacher_kwargs', 'student_kwargs'):
        try:
            assert isinstance(json.loads(getattr(args, k)), dict)
        except (ValueError, AssertionError):
            p.error(f"--{k.replace('_', '-')} must be a JSON object, got {getattr(args, k)!r}")
    if args.dataset == 'folder' and not (args.train_dir and args.test_dir):
        p.error('--dataset folder needs --train-dir and --test-dir')
    if args.resume and args.overwrite:
        p.error('--resume continues a run and --overwrite replaces it: choose one')
    parse_labels(args.labels)  # raises Abort on nonsense, before any work
    args.out_dir = args.out_dir or os.path.join('runs', f'{args.dataset}-{args.labels}-seed{args.seed}')
    return args


def offline():
    return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')


# ================================================================ data
def make_synthetic(n, size, num_classes=10, seed=0):
    """Learnable offline data: per class a smooth colour pattern; images are shifted, jittered, noisy copies."""
    g = torch.Generator().manual_seed(seed)
    pad = size // 8
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=size + 2 * pad, mode='bicubic')
    y = torch.arange(n) % num_classes
    rows, cols = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=g) + torch.arange(size)  # shifted crops: (n, size)
    x = protos[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def load_cifar(name, root, train):
    """CIFAR through torchvision; downloads when missing (unless HF_HUB_OFFLINE=1) and fails fast offline."""
    cls = torchvision.datasets.CIFAR100 if name == 'cifar100' else torchvision.datasets.CIFAR10
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:  # missing or unverified; download=True also unpacks an archive already in root
        hint = (f'{name} is not in --data-dir {root!r} and could not be downloaded ({{}}); put {cls.filename} '
                f'(or the extracted {cls.base_folder}/ folder) in a folder and point --data-dir there')
        if offline():
            raise Abort(hint.format('HF_HUB_OFFLINE=1 is set')) from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)  # an offline node fails in seconds, not minutes
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:
            raise Abort(hint.format(f'{type(e).__name__}: {e}')) from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes


def load_folder(root, size):
    """ImageFolder class folders, decoded once to uint8 at size x size (resize shorter side, centre crop)."""
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize(size), torchvision.transforms.CenterCrop(size),
                                         torchvision.transforms.PILToTensor()])
    try:
        ds = torchvision.datasets.ImageFolder(root, transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise Abort(f'cannot read image folder {root!r}: {e}') from None
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets), ds.classes


def load_data(args):
    """-> dict(train_x, train_y, test_x, test_y, classes, unl_x): uint8 images (N, 3, H, W) on the CPU."""
    if args.dataset == 'synthetic':
        (x, y), n = make_synthetic(args.synthetic_size * 5 // 4, args.image_size), args.synthetic_size
        return dict(train_x=x[:n], train_y=y[:n], test_x=x[n:], test_y=y[n:], classes=[str(c) for c in range(10)], unl_x=None)
    if args.dataset.startswith('cifar'):
        (x, y, classes), (tx, ty, _) = (load_cifar(args.dataset, args.data_dir, t) for t in (True, False))
        return dict(train_x=x, train_y=y, test_x=tx, test_y=ty, classes=classes, unl_x=None)
    (x, y, classes), (tx, ty, tc) = (load_folder(d, args.image_size) for d in (args.train_dir, args.test_dir))
    unl_x, uc = load_folder(args.unlabeled_dir, args.image_size)[::2] if args.unlabeled_dir else (None, classes)
    for other, uses in ((tc, '--test-dir'), (uc, '--unlabeled-dir')):
        if other != classes:
            raise Abort(f'class folders differ between --train-dir and {uses}: '
                        f'only in one of them: {sorted(set(classes) ^ set(other))}')
    return dict(train_x=x, train_y=y, test_x=tx, test_y=ty, classes=classes, unl_x=unl_x)


def parse_labels(spec):
    """'10pct' -> ('pct', 10.0); '400' -> ('count', 400); 'all' -> ('all', 1). Raises Abort on nonsense."""
    s = str(spec).strip().lower()
    try:
        kind, v = ('all', 1) if s == 'all' else ('pct', float(s[:-3])) if s.endswith('pct') else ('count', int(s))
        assert 0 < v and (kind != 'pct' or v <= 100)
        return kind, v
    except (ValueError, AssertionError):
        raise Abort(f"--labels {spec!r}: expected a percentage in (0, 100] ('10pct'), a positive count ('400') or 'all'") from None


def split_labeled(targets, labels, num_classes, seed):
    """Class-balanced split, own generator -> sorted long (labeled_idx, unlabeled_idx = all, as in FixMatch/USB)."""
    targets = torch.as_tensor(targets).long()
    kind, v = parse_labels(labels)
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


def augment(x):
    """Weak augmentation on x's device, 4-px reflect-pad random crop + flip: uint8 -> float [0, 255], flip mask."""
    B, _, H, W = x.shape
    dev = x.device
    x = F.pad(x.float(), (4, 4, 4, 4), mode='reflect')                          # (B, 3, H+8, W+8)
    dy, dx = torch.randint(0, 9, (2, B, 1), device=dev)
    flip = torch.rand(B, device=dev) < 0.5
    rows = dy + torch.arange(H, device=dev)                                      # (B, H)
    cols = dx + torch.arange(W, device=dev)                                      # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b, c = torch.arange(B, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None]
    return x[b, c, rows[:, None, :, None], cols[:, None, None, :]], flip


def model_view(model, res, device):
    """The input one model sees: resized to its own size, normalised with its own mean/std (its timm config)."""
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(cfg[k], device=device).view(1, 3, 1, 1) * 255 for k in ('mean', 'std'))

    def view(x):  # float (B, 3, H, W) in [0, 255] -> normalised (B, 3, res, res)
        if x.shape[-1] != res:
            x = F.interpolate(x, size=(res, res), mode='bilinear', align_corners=False, antialias=x.shape[-1] > res)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if device.type == 'cuda' else x
    return view


def epoch_batches(idx, batch, steps):
    """`steps` batches of `batch` indices from back-to-back random permutations of idx: (steps, batch)."""
    perms = [idx[torch.randperm(len(idx), device=idx.device)] for _ in range(math.ceil(steps * batch / len(idx)))]
    return torch.cat(perms)[:steps * batch].view(steps, batch)


# ================================================================ models
def create_model(name, num_classes, res, pretrained, weights, kwargs, role):
    """A timm model; ViTs are built for `res` (timm resamples pretrained position embeddings)."""
    if not timm.is_model(name):
        raise Abort(f"--{role}: unknown timm model {name!r} (list them with timm.list_models('*pattern*'))")
    kw = dict(num_classes=num_classes, pretrained=pretrained or bool(weights), **kwargs)
    if weights:
        if not os.path.isfile(weights):
            raise Abort(f'--{role}-weights: no file {weights!r}')
        kw['pretrained_cfg_overlay'] = dict(file=weights, source='timm')
    elif pretrained and not offline():  # hub unreachable: use the local cache only, failing now, not after retries
        from huggingface_hub import constants
        url = urllib.parse.urlsplit(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        try:
            return timm.create_model(name, img_size=res, **kw)
        except TypeError as e:  # CNNs take no img_size
            if 'img_size' not in str(e):
                raise
            return timm.create_model(name, **kw)
    except Exception as e:
        if not kw['pretrained']:
            raise
        raise Abort(f'could not load pretrained weights for {name} ({type(e).__name__}): offline? use --no-pretrained, '
                    f'or a local file with --teacher-weights/--student-weights FILE; HF_HUB_OFFLINE=1 uses only the '
                    f'local hub cache') from None


def features(model, x):
    """Pooled pre-logits feature of any timm-style model: (B, d)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def final_activation(student, mode):
    """P_c's output is a *target for f_s*, so it ends where f_s ends (a gap the paper leaves): timm's MobileNetV3
    pre-logits come out of `act2` (Hardswish, min -0.375) after `conv_head`; other students: identity."""
    act = getattr(student, 'act2', None)
    ends_in_act = mode == 'auto' and hasattr(student, 'conv_head') and isinstance(act, nn.Module)
    return copy.deepcopy(act) if ends_in_act else nn.Identity()


def build(args, num_classes, device, teacher=None, student=None):
    """Models, projectors and views. The teacher is built only if a feature loss needs it."""
    if student is None:
        student = create_model(args.student, num_classes, args.student_res, args.pretrained, args.student_weights,
                               json.loads(args.student_kwargs), 'student')
    use_teacher = args.w_custom > 0 or args.w_general > 0
    if use_teacher and teacher is None:
        teacher = create_model(args.teacher, 0, args.teacher_res, args.pretrained, args.teacher_weights,
                               json.loads(args.teacher_kwargs), 'teacher')
    channels_last = dict(memory_format=torch.channels_last) if device.type == 'cuda' else {}
    maybe_compile = torch.compile if args.compile else (lambda f: f)
    kd = SimpleNamespace(student=student.to(device, **channels_last), head=student.get_classifier(), device=device, teacher=None,
                         proj_custom=None, proj_general=None, head_c=None, cache_train=None, cache_test=None,
                         amp=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'))
    with torch.no_grad():  # shapes from a dummy forward, in eval mode so BatchNorm statistics stay untouched
        d_s = features(student.eval(), torch.zeros(1, 3, args.student_res, args.student_res, device=device)).shape[-1]
    if kd.head(torch.zeros(1, d_s, device=device)).shape[-1] != num_classes:
        raise Abort(f'the student head must output {num_classes} classes')
    kd.view_s = model_view(student, args.student_res, device)
    kd.feat_s = maybe_compile(partial(features, student))
    if use_teacher:
        kd.teacher = teacher.to(device, **channels_last).eval().requires_grad_(False)         # frozen, always
        with torch.no_grad():
            d_t = features(teacher, torch.zeros(1, 3, args.teacher_res, args.teacher_res, device=device)).shape[-1]
        kd.view_t = model_view(teacher, args.teacher_res, device)
        kd.feat_t = maybe_compile(partial(features, teacher))
    if args.w_custom > 0:  # [CustomKD] P_c: d_t -> d_s, the customization projector (paper θ_t^h)
        kd.proj_custom = nn.Sequential(nn.Linear(d_t, d_s), final_activation(student, args.proj_act)).to(device)
        kd.head_c = kd.head if args.custom_head == 'student' else \
            nn.Linear(d_s, num_classes).to(device).requires_grad_(False)                      # ablation: random head
    if args.w_general > 0:  # P_g: d_s -> d_t, the general projector on the student side
        kd.proj_general = nn.Linear(d_s, d_t).to(device)
    return kd


def teacher_forward(kd, x):
    """f_t for a float image batch, under inference mode; cloned so that autograd may save it."""
    with torch.inference_mode(), kd.amp():
        f_t = kd.feat_t(kd.view_t(x))                                                         # (B, d_t)
    return f_t.clone()


def teacher_features(kd, x, idx, flip):
    """f_t of the augmented batch x, or, with --teacher-cache, of the cached plain/flipped view of images idx."""
    if kd.cache_train is not None:
        return kd.cache_train[idx, flip.long()].float()                                       # (B, d_t)
    return teacher_forward(kd, x)


def build_teacher_cache(kd, x_pool, x_test, batch):
    """Features of every training image (plain and flipped) and every test image, once; bf16 on the device."""
    def run(x, flip):  # (N, d_t)
        views = (x[i:i + batch].to(kd.device).float() for i in range(0, len(x), batch))
        return torch.cat([teacher_forward(kd, v.flip(-1) if flip else v).to(torch.bfloat16) for v in views])
    if x_pool is not None:
        kd.cache_train = torch.stack([run(x_pool, False), run(x_pool, True)], 1)               # (N, 2, d_t)
    kd.cache_test = run(x_test, False)                                                        # (N_test, d_t)


# ================================================================ losses (DESIGN.md §2; paper Fig. 2)
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


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred; x (n, p), y (n, q)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


# ================================================================ the two stages
def set_stage(kd, stage):
    """Frozen means frozen: stage 1 may change only P_c; stage 2 only the student (with h) and P_g."""
    for module, trainable in ((kd.teacher, False), (kd.proj_custom, stage == 1), (kd.student, stage == 2),
                              (kd.proj_general, stage == 2)):
        if module is not None:
            module.requires_grad_(trainable).train(trainable)  # the teacher: no gradients, eval mode, always


def take_step(opt, loss):
    """One optimizer step on `loss` (SGD for the student side, Adam for P_c)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def customize_epoch(kd, x_pool, y_pool, labeled_idx, batch, opt):
    """[CustomKD] Stage 1, feature customization: one pass over D_L that trains only P_c, through the head h."""
    set_stage(kd, 1)
    batch = min(batch, len(labeled_idx))
    total = torch.zeros((), device=kd.device)
    steps = epoch_batches(labeled_idx, batch, len(labeled_idx) // batch)
    for idx in steps:
        x, flip = augment(x_pool[idx])
        f_t = teacher_features(kd, x, idx, flip)                                              # (B, d_t)
        with kd.amp():
            logits = kd.head_c(kd.proj_custom(f_t))                        # [CustomKD] (B, C): h(P_c(f_t))
        loss = loss_customize(logits, y_pool[idx])                         # [CustomKD]
        take_step(opt, loss)
        total += loss.detach()
    return (total / len(steps)).item(), len(steps) * batch


def distill_step(kd, x, y_l, idx, flip, weights):
    """[CustomKD] Stage 2, distillation: the four terms on one batch x = [x_l; x_u]. Returns {log key: term}."""
    n_l = len(y_l)
    with kd.amp():
        f_s = kd.feat_s(kd.view_s(x))                                                         # (B_l+B_u, d_s)
        logits = kd.head(f_s)                                                                 # (B_l+B_u, C)
        terms = {'loss/sup': loss_sup(logits[:n_l], y_l),                  # [CustomKD] L_L on D_L
                 'loss/entropy': loss_entropy(logits[n_l:])}               # [CustomKD] L_U on D_U
        if kd.teacher is not None:
            f_t = teacher_features(kd, x, idx, flip)                                          # (B, d_t), no grad
            if weights['loss/feat_custom'] > 0:
                with torch.no_grad():
                    f_t_custom = kd.proj_custom(f_t)                                          # (B, d_s), P_c frozen
                terms['loss/feat_custom'] = loss_feat_custom(f_s, f_t_custom)            # [CustomKD] L_f~t
            if weights['loss/feat_general'] > 0:
                terms['loss/feat_general'] = loss_feat_general(kd.proj_general(f_s), f_t)  # [CustomKD] L_ft
    return terms


def distill_epoch(kd, x_pool, y_pool, labeled_idx, unlabeled_idx, args, opt, epoch, weights):
    """One pass over D_U; each step also takes a batch of D_L (cycled). Returns mean terms and #images."""
    set_stage(kd, 2)
    b_l = min(args.batch_size, len(labeled_idx))
    b_u = min(args.mu * args.batch_size, len(unlabeled_idx))
    n_steps = len(unlabeled_idx) // b_u
    sums, first_bad, bad_never = {}, {}, torch.tensor(n_steps, device=kd.device)
    for s, (il, iu) in enumerate(zip(epoch_batches(labeled_idx, b_l, n_steps), epoch_batches(unlabeled_idx, b_u, n_steps))):
        for group in opt.param_groups:  # cosine decay over all stage-2 steps of the run
            group['lr'] = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch * n_steps + s) / (args.epochs * n_steps)))
        idx = torch.cat([il, iu])
        x, flip = augment(x_pool[idx])              # the same view for teacher and student
        terms = distill_step(kd, x, y_pool[il], idx, flip, weights)
        loss = sum(weights[k] * v for k, v in terms.items())               # [CustomKD] the weighted sum
        take_step(opt, loss)
        for k, v in terms.items():  # device-side sums: no host sync per step
            sums[k] = sums.get(k, 0) + v.detach()
            first_bad[k] = torch.minimum(first_bad.get(k, bad_never), torch.where(v.isfinite(), n_steps, s))
    first = min(int(v) for v in first_bad.values())
    culprits = [k for k, v in first_bad.items() if v == first < n_steps]  # the term(s) that went non-finite first
    return {k: (v / n_steps).item() for k, v in sums.items()}, n_steps * (b_l + b_u), culprits


# ================================================================ evaluation
@torch.no_grad()
def evaluate(kd, x_test, y_test, batch, cka_idx):
    """Test accuracy of the student and of h(P_c(f_t)); linear CKA of f_s against f~_t and f_t on a fixed subset."""
    kd.student.eval()
    with kd.amp():
        f_s = torch.cat([kd.feat_s(kd.view_s(x_test[i:i + batch].float())).float()
                         for i in range(0, len(x_test), batch)])                              # (N, d_s)
    out = {'acc/student': (kd.head(f_s).argmax(-1) == y_test).float().mean().item()}
    if kd.teacher is None:
        return out
    others = {'cka/student_vs_teacher': kd.cache_test.float()}                               # f_t: (N, d_t)
    if kd.proj_custom is not None:
        others['cka/student_vs_custom'] = f_t_custom = kd.proj_custom(others['cka/student_vs_teacher'])  # (N, d_s)
        out['acc/teacher_custom'] = (kd.head_c(f_t_custom).argmax(-1) == y_test).float().mean().item()
    if len(cka_idx) > 1:
        out.update({key: linear_cka(f_s[cka_idx], f[cka_idx]) for key, f in others.items()})
    return out


# ================================================================ checkpoints and logging
def save_atomic(obj, path):
    """Write to a temporary file, fsync, then rename: a crash never leaves a broken file in place."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(obj.encode()) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, identity):
    """Load with weights_only=True (never runs pickled code) and refuse a checkpoint of another run."""
    if not os.path.isfile(path):
        raise Abort(f'--resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        assert isinstance(ckpt, dict) and 'identity' in ckpt
    except Exception as e:
        raise Abort(f'--resume: {path} is not a readable CustomKD checkpoint (truncated, corrupt or foreign: '
                    f'{type(e).__name__}); delete it or choose another --out-dir') from None
    for k, v in identity.items():
        if ckpt['identity'].get(k) != v:
            raise Abort(f"--resume: {path} was written with --{k.replace('_', '-')} {ckpt['identity'].get(k)}, "
                        f'not {v}; use the original value or another --out-dir')
    return ckpt


def peak_mb(device):
    """Peak memory since the last call: CUDA allocations on a GPU; on a CPU the process's peak RSS."""
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's lifetime peak


def console_line(row, epochs):
    def f(key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else '-'.rjust(len(fmt.format(0.0)))
    return (f"epoch {row['epoch']:3d}/{epochs} | cust {f('loss/customize', '{:6.3f}')} | feat_c {f('loss/feat_custom', '{:7.4f}')} "
            f"feat_g {f('loss/feat_general', '{:7.4f}')} sup {f('loss/sup', '{:6.3f}')} ent {f('loss/entropy', '{:6.3f}')} | "
            f"acc {f('acc/student', '{:.4f}')} teacher_custom {f('acc/teacher_custom', '{:.4f}')} | "
            f"cka {f('cka/student_vs_custom', '{:.3f}')}/{f('cka/student_vs_teacher', '{:.3f}')} | "
            f"{f('time/distill_s', '{:7.1f}')}s {f('throughput/distill_img_s', '{:7.0f}')} img/s {f('mem/peak_mb', '{:7.0f}')} MB")


# ================================================================ main
def run(args, teacher=None, student=None):
    t_start = time.time()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise Abort(f'--device cuda, but this torch {torch.__version__} sees no CUDA device; use --device cpu')
    device = torch.device('cuda' if args.device != 'cpu' and torch.cuda.is_available() else 'cpu')
    identity = {k: getattr(args, k) for k in IDENTITY}
    if teacher is not None or student is not None:  # your own modules: recorded by class name
        args.teacher, args.student = (type(m).__name__ if m is not None else n
                                      for m, n in ((teacher, args.teacher), (student, args.student)))
        identity.update(teacher=args.teacher, student=args.student)
    ckpt_path = os.path.join(args.out_dir, 'checkpoint.pt')
    ckpt = load_checkpoint(ckpt_path, identity) if args.resume else None
    if not args.resume and os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise Abort(f'run directory {args.out_dir} exists: add --resume to continue it, --overwrite to replace it, '
                    f'or choose another --out-dir')
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA lacks a few kernels
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.manual_seed(args.seed)

    data = load_data(args)
    num_classes = len(data['classes'])
    labeled_idx, unlabeled_idx = split_labeled(data['train_y'], args.labels, num_classes, args.split_seed)
    x_pool, y_pool = data['train_x'], data['train_y']
    if data['unl_x'] is not None:  # domain adaptation: the unlabeled set is the target domain alone
        unlabeled_idx = torch.arange(len(x_pool), len(x_pool) + len(data['unl_x']))
        x_pool = torch.cat([x_pool, data['unl_x']])
        y_pool = torch.cat([y_pool, torch.full((len(data['unl_x']),), -1)])  # never read
    if ckpt is not None and not torch.equal(ckpt['labeled_idx'], labeled_idx):
        raise Abort('--resume: the labeled split differs from the checkpoint\'s (different data?)')
    kd = build(args, num_classes, device, teacher, student)

    weights = {'loss/feat_custom': args.w_custom, 'loss/feat_general': args.w_general,
               'loss/sup': args.w_sup, 'loss/entropy': args.w_ent}
    params = list(kd.student.parameters()) + (list(kd.proj_general.parameters()) if kd.proj_general else [])
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    opt_custom = torch.optim.Adam(kd.proj_custom.parameters(), lr=args.lr_custom) if kd.proj_custom else None
    parts = dict(student=kd.student, proj_custom=kd.proj_custom, proj_general=kd.proj_general, head_c=kd.head_c,
                 opt=opt, opt_custom=opt_custom)  # what a checkpoint holds besides counters and RNG states
    start, history, wall = 0, [], 0.0
    if ckpt is not None:
        for key, part in parts.items():
            if part is not None:
                part.load_state_dict(ckpt[key])
        start, history, wall = ckpt['epoch'], ckpt['history'], ckpt['wall_time_s']
        torch.set_rng_state(ckpt['rng_cpu'])
        if device.type == 'cuda' and ckpt['rng_cuda']:
            torch.cuda.set_rng_state_all(ckpt['rng_cuda'])

    os.makedirs(args.out_dir, exist_ok=True)
    save_atomic(json.dumps(vars(args), indent=2) + '\n', os.path.join(args.out_dir, 'args.json'))
    metrics_path = os.path.join(args.out_dir, 'metrics.jsonl')
    save_atomic(''.join(json.dumps(r) + '\n' for r in history), metrics_path)  # the checkpoint's epochs, exactly
    for name in ('summary.json',) if args.resume else ('summary.json', 'checkpoint.pt', 'student.pt'):
        if os.path.exists(os.path.join(args.out_dir, name)):  # --overwrite: nothing of the old run survives
            os.remove(os.path.join(args.out_dir, name))

    x_pool, y_pool, labeled_idx, unlabeled_idx = (t.to(device) for t in (x_pool, y_pool, labeled_idx, unlabeled_idx))
    x_test, y_test = data['test_x'].to(device), data['test_y'].to(device)
    batch_eval = args.batch_size * (1 + args.mu)
    cka_idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:args.cka_samples].to(device)
    def clock():  # seconds, after the device has finished its queued work
        torch.cuda.synchronize() if device.type == 'cuda' else None
        return time.perf_counter()
    t = clock()
    if kd.teacher is not None:  # test features always (the teacher is frozen); train features with --teacher-cache
        build_teacher_cache(kd, x_pool if args.teacher_cache else None, x_test, batch_eval)
    time_cache = clock() - t
    print(f'customkd: {args.dataset} {num_classes} classes, {len(labeled_idx)} labeled / {len(unlabeled_idx)} unlabeled / '
          f'{len(x_test)} test | student {args.student} | teacher {args.teacher if kd.teacher else "none (not loaded)"} | '
          f'{device.type} | teacher features cached in {time_cache:.1f}s | out {args.out_dir}', flush=True)

    best = max([r['acc/student'] for r in history if r['acc/student'] is not None], default=None)
    for epoch in range(start, args.epochs):
        row = {**dict.fromkeys(METRIC_KEYS), 'epoch': epoch + 1}
        if kd.proj_custom is not None and epoch % args.custom_every == 0:  # [CustomKD] stage 1, then stage 2
            t = clock()
            row['loss/customize'], n_img = customize_epoch(kd, x_pool, y_pool, labeled_idx, args.batch_size, opt_custom)
            row['time/customize_s'] = clock() - t
            row['throughput/customize_img_s'] = n_img / row['time/customize_s']
        t = clock()
        terms, n_img, culprits = distill_epoch(kd, x_pool, y_pool, labeled_idx, unlabeled_idx, args, opt, epoch, weights)
        row.update(terms, **{'time/distill_s': clock() - t})
        row['throughput/distill_img_s'] = n_img / row['time/distill_s']
        culprits = ['loss/customize'] if not math.isfinite(row['loss/customize'] or 0.0) else culprits
        if culprits:
            raise Abort(f"{' and '.join(culprits)} became non-finite in epoch {epoch + 1}; stopped. The checkpoint of "
                        f'epoch {epoch} in {args.out_dir} is kept (lower --lr or a loss weight, then --resume)', code=3)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            t = clock()
            row.update(evaluate(kd, x_test, y_test, batch_eval, cka_idx), **{'time/eval_s': clock() - t})
            best = max(best or 0.0, row['acc/student'])
        row['mem/peak_mb'] = peak_mb(device)
        history.append(row)
        save_atomic(dict(identity=identity, epoch=epoch + 1, history=history, wall_time_s=wall + time.time() - t_start,
                         labeled_idx=labeled_idx.cpu(), rng_cpu=torch.get_rng_state(),
                         rng_cuda=torch.cuda.get_rng_state_all() if device.type == 'cuda' else [],
                         **{k: p.state_dict() if p is not None else {} for k, p in parts.items()}), ckpt_path)
        save_atomic(dict(state_dict=kd.student.state_dict(), model=args.student, num_classes=num_classes),
                    os.path.join(args.out_dir, 'student.pt'))
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        print(console_line(row, args.epochs), flush=True)

    last = history[-1] if history else dict.fromkeys(METRIC_KEYS)
    total = {k: sum(r[k] or 0.0 for r in history) for k in ('time/customize_s', 'time/distill_s', 'time/eval_s')}
    summary = dict(acc_student_last=last['acc/student'], acc_student_best=best,
                   acc_teacher_custom_last=last['acc/teacher_custom'], epochs=len(history),
                   num_labeled=len(labeled_idx), num_unlabeled=len(unlabeled_idx), num_train_images=len(x_pool),
                   wall_time_s=wall + time.time() - t_start, **total, **{'time/teacher_cache_s': time_cache},
                   **{'mem/peak_mb': max((r['mem/peak_mb'] for r in history), default=None)}, args=vars(args))
    save_atomic(json.dumps(summary, indent=2) + '\n', os.path.join(args.out_dir, 'summary.json'))
    print(f"customkd: last-epoch student accuracy {summary['acc_student_last']:.4f} (best epoch: {best:.4f}); "
          f"wall {summary['wall_time_s']:.0f}s; outputs in {args.out_dir}")
    return summary


def main(argv=None, teacher=None, student=None):
    """Run the CLI and return the summary dict. `teacher`/`student`: your own built modules (README)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends a run as Ctrl-C does
    try:
        return run(parse_args(argv), teacher, student)
    except Abort as e:
        fail(e, e.code)
    except KeyboardInterrupt:
        fail("interrupted; the last completed epoch's checkpoint.pt is intact: rerun the same command with --resume", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    main()
