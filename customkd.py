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
  torchrun --nproc_per_node=8 customkd.py --dataset cifar100        # the same run on 8 GPUs (DDP)
  python customkd.py --dataset synthetic                            # offline CPU demo, about a minute
  HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py             # the tests (CPU, no network)

Measured (2-core AMD EPYC CPU, no GPU; torch 2.14.1, timm 1.0.31, Python 3.11.7; seeds 0-4 of --seed and
--split-seed, mean ± std): the offline demo ends at last-epoch student accuracy 0.960 ± 0.045 after 8 epochs,
69 ± 3 s wall per run; `L_ft` only 0.947 ± 0.060, no teacher 0.863 ± 0.060 (chance 0.1). Exact values differ
between CPUs. CIFAR-100 and every GPU figure: not yet measured. README.md has the tables and what they do not show.
"""
import argparse, hashlib, json, math, os, resource, signal, socket, sys, time  # noqa: E401 (the standard library)
from functools import partial
from types import SimpleNamespace

import timm, torch, torchvision  # noqa: E401
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

# ================================================================ configuration
# Defaults that differ by dataset; a flag given on the command line always wins.
COMMON = dict(teacher='vit_large_patch14_dinov2.lvd142m', student='mobilenetv3_large_100.ra_in1k',
              teacher_kwargs='{}', student_kwargs='{}', teacher_res=224, student_res=224, pretrained=True,
              epochs=30, lr=0.01, batch_size=64, mu=7, image_size=224, demo_teacher_steps=0)
PRESETS = {'synthetic': dict(teacher='vit_tiny_patch16_224', teacher_kwargs='{"depth": 2, "patch_size": 8}',
                             student='mobilenetv3_small_050', teacher_res=32, student_res=32, pretrained=False,
                             epochs=8, lr=0.02, batch_size=16, mu=3, image_size=32, demo_teacher_steps=150)}
# Flags that define a run: --resume refuses a checkpoint written with other values.
IDENTITY = ('dataset', 'labels', 'labeled_list', 'split_seed', 'teacher', 'student', 'teacher_kwargs',
            'student_kwargs', 'train_dir', 'unlabeled_dir', 'synthetic_size', 'image_size', 'demo_teacher_steps')
METRIC_KEYS = ('epoch', 'loss/customize', 'loss/feat_custom', 'loss/feat_general', 'loss/sup', 'loss/entropy',
               'acc/student', 'acc/teacher_custom', 'cka/student_vs_custom', 'cka/student_vs_teacher',
               'time/customize_s', 'time/distill_s', 'time/eval_s', 'throughput/customize_img_s',
               'throughput/distill_img_s', 'mem/peak_mb')
# This process: its place under torchrun, and the phase that an unexpected error is reported in.
RUN = SimpleNamespace(rank=0, world=1, phase='setup')


class Abort(ValueError):
    """A failure the user can act on: `main` prints it as one line and exits with `code`."""
    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code

def fail(msg, code=2):
    print(f"customkd: error: {f'[rank {RUN.rank}] ' if RUN.world > 1 else ''}{msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)

def num(kind, lo, hi, open_lo=False):
    """argparse type: an int or float in [lo, hi] ((lo, hi] with open_lo); NaN fails every comparison."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            v = math.nan  # fails every comparison, as NaN itself does
        if not ((v > lo if open_lo else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} in "
                                             f"{'(' if open_lo else '['}{lo}, {hi}], got {s!r}")
        return v
    return parse

def build_parser():
    p = argparse.ArgumentParser(description='CustomKD: customize a frozen foundation teacher to a student, then distil')
    p.error = fail  # one line, exit 2, instead of argparse's usage dump
    count, seed, side = num(int, 1, 10**6), num(int, 0, 2**31 - 1), num(int, 8, 1024)
    weight, rate = num(float, 0, 1000), num(float, 0, 10, open_lo=True)
    add = p.add_argument_group('data').add_argument
    add('--dataset', default='cifar100', choices=['cifar100', 'cifar10', 'synthetic', 'folder'],
        help='cifar100/cifar10 (downloaded to --data-dir), synthetic (generated offline), folder (class folders)')
    add('--data-dir', default='./data', help='where CIFAR lives or is downloaded to (default ./data)')
    add('--train-dir', help='folder dataset: class folders of training images (the labeled candidates)')
    add('--test-dir', help='folder dataset: class folders of test images')
    add('--unlabeled-dir', help='folder dataset: class folders that are the unlabeled set instead (labels unread)')
    add('--labeled-list', help='folder dataset: file of training images, a name per line, labeled instead of --labels')
    add('--cache-dir', help='where folders are decoded once to uint8 arrays (default DATA_DIR/decoded)')
    add('--workers', type=num(int, 1, 1024), help='processes that decode a folder (default: all cores)')
    add('--image-size', type=side, help='side of stored synthetic/folder images (default 224; synthetic 32)')
    add('--synthetic-size', type=num(int, 10, 10**6), default=1600, help='synthetic: training images (+25%% test)')
    add('--labels', default='10pct', help="labeled set: '10pct' of each class, '400' in all, or 'all' (default 10pct)")
    add('--split-seed', type=seed, default=0, help='seed of the labeled split (default 0)')
    add = p.add_argument_group('models (any timm name)').add_argument
    add('--teacher', help=f"frozen teacher (default {COMMON['teacher']}; synthetic: 2-block ViT-Tiny)")
    add('--student', help=f"student (default {COMMON['student']}; synthetic: mobilenetv3_small_050)")
    add('--teacher-kwargs', help='JSON of extra timm.create_model arguments for the teacher, e.g. {"depth": 2}')
    add('--student-kwargs', help='JSON of extra timm.create_model arguments for the student')
    add('--teacher-res', type=side, help='teacher input side in pixels (default 224; synthetic 32)')
    add('--student-res', type=side, help='student input side in pixels (default 224; synthetic 32)')
    add('--pretrained', action=argparse.BooleanOptionalAction, help='hub weights (default on; synthetic off)')
    add('--teacher-weights', help='local teacher weight file, loaded by timm (position embeddings resized)')
    add('--student-weights', help='local student weight file, loaded by timm')
    add('--proj-act', default='auto', choices=['auto', 'none'], help="P_c ends with the student's final activation")
    add('--demo-teacher-steps', type=num(int, 0, 10**5), help='synthetic: steps that first train the demo teacher')
    add = p.add_argument_group('method (the loss weights and the two-stage schedule)').add_argument
    add('--w-custom', type=weight, default=1.0, help='weight of L_f~t = MSE(f_s, P_c(f_t)) (default 1)')
    add('--w-general', type=weight, default=1.0, help='weight of L_ft = MSE(P_g(f_s), f_t) (default 1)')
    add('--w-sup', type=weight, default=1.0, help='weight of the supervised CE on labeled images (default 1)')
    add('--w-ent', type=weight, default=1.0, help='weight of entropy minimisation on unlabeled images (default 1)')
    add('--custom-every', type=count, default=1, help="stage 1 every N epochs (default 1: the paper's best)")
    add('--custom-head', default='student', choices=['student', 'random'], help="head reading P_c(f_t) in stage 1")
    add = p.add_argument_group('optimisation (--batch-size and --mu are global, at any process count)').add_argument
    add('--epochs', type=count, help='epochs, each = stage 1 + stage 2 (default 30; synthetic 8)')
    add('--batch-size', type=count, help='labeled images per step (default 64; synthetic 16)')
    add('--mu', type=num(int, 1, 1000), help='unlabeled per labeled image in a step (default 7; synthetic 3)')
    add('--lr', type=rate, help='SGD rate of student and P_g, cosine decay (default 0.01; synthetic 0.02)')
    add('--lr-custom', type=rate, default=1e-3, help='Adam learning rate of P_c (default 1e-3)')
    add('--weight-decay', type=num(float, 0, 1), default=5e-5, help='SGD weight decay (default 5e-5)')
    add = p.add_argument_group('speed').add_argument
    add('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    add('--precision', default='auto', choices=['auto', 'bf16', 'fp32'], help='bf16 autocast + channels_last; '
        'auto: bf16 on CUDA only')
    add('--teacher-cache', action='store_true', help='teacher features of every image and its flip, computed once')
    add('--compile', action='store_true', help='torch.compile the teacher and the student side')
    add('--deterministic', action='store_true', help='deterministic algorithms (slower on GPU)')
    add = p.add_argument_group('run').add_argument
    add('--seed', type=seed, default=0, help='seed of everything but the split (default 0)')
    add('--eval-every', type=count, default=1, help='evaluate every N epochs and at the last (default 1)')
    add('--cka-samples', type=num(int, 0, 10**5), default=1000, help='test images for CKA; 0: off (default 1000)')
    add('--out-dir', help='run directory (default runs/DATASET-LABELS-seedSEED)')
    add('--resume', action='store_true', help='continue the run in --out-dir from its checkpoint.pt')
    add('--overwrite', action='store_true', help='replace the outputs of an existing run directory')
    return p

def parse_args(argv=None):
    """Every flag checked before any work: numbers by the parser, here paths and combinations."""
    p = build_parser()
    args = p.parse_args(argv)
    defaults = {**COMMON, **PRESETS.get(args.dataset, {})}
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    flag = lambda k: '--' + k.replace('_', '-')  # noqa: E731
    for k in ('teacher_kwargs', 'student_kwargs'):
        try:
            kwargs = json.loads(getattr(args, k))
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            p.error(f'{flag(k)} must be a JSON object, got {getattr(args, k)!r}')
    for k in ('train_dir', 'test_dir', 'unlabeled_dir', 'labeled_list', 'demo_teacher_steps'):
        only = 'synthetic' if k == 'demo_teacher_steps' else 'folder'
        if args.dataset != only and getattr(args, k) != defaults.get(k):
            p.error(f'{flag(k)} is only for --dataset {only}')
    if args.dataset == 'folder' and not (args.train_dir and args.test_dir):
        p.error('--dataset folder needs --train-dir and --test-dir')
    if args.resume and args.overwrite:
        p.error('--resume continues a run and --overwrite replaces it: choose one')
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

def offline():
    return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')

def progress(items, what, total, per=1):
    """Yield items; after 10 s, rank 0 shows done/total, rate, time left (terminal: one line; log: one a minute)."""
    t0 = shown = time.time()
    tty = sys.stderr.isatty()
    for i, item in enumerate(items, 1):
        yield item
        now, done = time.time(), min(i * per, total)
        if RUN.rank == 0 and now - t0 > 10 and now - shown > (0.5 if tty else 60):
            shown, rate = now, done / (now - t0)
            print(f"{chr(13) if tty else ''}{what}: {done}/{total}, {rate:.0f}/s, {(total - done) / rate:.0f} s "
                  'left ', end='' if tty else '\n', file=sys.stderr)
    if RUN.rank == 0 and tty and shown > t0:
        print('\r\033[K', end='', file=sys.stderr)

# ================================================================ several processes (torchrun)
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
    """This rank's equal share of a global batch (dim 0): together the ranks see what one process would."""
    k = len(t) // RUN.world
    return t[RUN.rank * k:(RUN.rank + 1) * k]

def all_reduce(t, op=dist.ReduceOp.SUM):
    if RUN.world > 1:
        dist.all_reduce(t, op=op)
    return t

def sharded_rows(n, batch, fn, device, out_device, what):
    """fn(i, j) -> rows i:j of an (n, ...) result: each rank computes its own shard, then all gather all n rows."""
    m = math.ceil(n / RUN.world)
    lo, hi = min(n, RUN.rank * m), min(n, RUN.rank * m + m)
    steps = progress(range(lo, hi, batch), what, hi - lo, batch)
    local = torch.cat([fn(i, min(i + batch, hi)).to(out_device) for i in steps])
    if RUN.world == 1:
        return local
    parts = [torch.empty(m, *local.shape[1:], dtype=local.dtype, device=device) for _ in range(RUN.world)]
    dist.all_gather(parts, torch.cat([local, local.new_zeros(m - len(local), *local.shape[1:])]).to(device))
    return torch.cat([part.to(out_device) for part in parts])[:n]

# ================================================================ data
def make_synthetic(n, size, num_classes=10, seed=0):
    """Learnable offline data: per class a smooth colour pattern; images are shifted, jittered, noisy copies."""
    g = torch.Generator().manual_seed(seed)
    pad = size // 8
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=size + 2 * pad, mode='bicubic')
    y = torch.arange(n) % num_classes
    rows, cols = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=g) + torch.arange(size)  # shifted crops
    x = protos[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows[:, None, :, None],
               cols[:, None, None, :]]
    x = x * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

def load_cifar(name, root, train):
    """CIFAR through torchvision; downloads when missing (unless HF_HUB_OFFLINE=1) and fails fast offline."""
    cls = torchvision.datasets.CIFAR100 if name == 'cifar100' else torchvision.datasets.CIFAR10
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an offline node fails in seconds, not minutes
    try:  # download=True first checks the files (and unpacks an archive already in root)
        ds = cls(root, train=train, download=not offline())
    except Exception as e:
        why = 'HF_HUB_OFFLINE=1 is set' if offline() else f'{type(e).__name__}: {e}'
        raise Abort(f'{name} is not in --data-dir {root!r} and could not be downloaded ({why}); put {cls.filename} '
                    f'(or the extracted {cls.base_folder}/ folder) in a folder and point --data-dir there') from None
    finally:
        socket.setdefaulttimeout(old)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes

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

def class_folders(root):
    """ImageFolder layout: (sorted class folder names, {name: index})."""
    try:
        return torchvision.datasets.folder.find_classes(root)
    except OSError as e:
        raise Abort(f'cannot read image folder {root!r}: {e}') from None

def load_folders(dirs, args, classes=None):
    """[(flag, class folder)] -> uint8 (N, 3, S, S) mapped from an array file decoded once (reused while the file list
    and S stay), labels (-1 for --unlabeled-dir: never read), classes, file names."""
    files, y, names, size = [], [], [], args.image_size
    for flag, root in dirs:
        found, to_idx = class_folders(root)
        items = torchvision.datasets.folder.make_dataset(root, to_idx, tuple(Image.registered_extensions()),
                                                         allow_empty=True)
        if not items or classes is not None and found != classes:
            raise Abort(f'{flag} {root!r} holds no images' if not items else f'class folders differ between '
                        f'--train-dir and {flag}: only in one of them: {sorted(set(classes) ^ set(found))}')
        classes, files = found, files + [f for f, _ in items]
        names += [os.path.relpath(f, root) for f, _ in items]
        y += [-1 if flag == '--unlabeled-dir' else c for _, c in items]  # a target domain's labels are never read
    n = len(files)
    key = hashlib.sha1(json.dumps([[os.path.abspath(r) for _, r in dirs], size, names]).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f'{os.path.basename(os.path.abspath(dirs[0][1]))}-{size}px-{key}.u8')
    while int(os.environ.get('LOCAL_RANK', 0)) > 0 and not os.path.exists(path):
        time.sleep(1)  # one process per machine decodes; the others wait for the file
    if not os.path.exists(path):
        os.makedirs(args.cache_dir, exist_ok=True)
        disk = os.statvfs(args.cache_dir)
        if n * 3 * size * size > disk.f_bavail * disk.f_frsize:  # checked now: a full disk mid-decode kills the process
            raise Abort(f'{n} images at {size} px need {n * 3 * size * size / 1e9:.1f} GB in --cache-dir '
                        f'{args.cache_dir}; {disk.f_bavail * disk.f_frsize / 1e9:.1f} GB are free')
        tmp, bad = f'{path}.partial-{socket.gethostname()}-{os.getpid()}', []
        try:
            out = torch.from_file(tmp, shared=True, size=n * 3 * size * size, dtype=torch.uint8).view(n, 3, size, size)
            loader = torch.utils.data.DataLoader(files, 256, num_workers=args.workers or len(os.sched_getaffinity(0)),
                                                 collate_fn=partial(decode, size))
            for i, (x, unreadable) in enumerate(progress(loader, f'decoding {dirs[0][1]}', n, 256)):
                out[i * 256:i * 256 + len(x)], bad = x, bad + unreadable
            if bad:
                raise Abort(f'{len(bad)} image file(s) cannot be read, e.g. {bad[0]}; remove or replace them')
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    x = torch.from_file(path, size=n * 3 * size * size, dtype=torch.uint8).view(n, 3, size, size)
    return x, torch.tensor(y), classes, names

def load_data(args):
    """-> dict of uint8 (N, 3, H, W) images and labels; with --unlabeled-dir, the target domain after the source's."""
    if args.dataset == 'synthetic':  # + images for the demo teacher, from the same classes, never seen by the student
        n, n_test = args.synthetic_size, args.synthetic_size // 4
        x, y = make_synthetic(n + n_test + 2000 * (args.demo_teacher_steps > 0), args.image_size)
        return dict(train_x=x[:n], train_y=y[:n], test_x=x[n:n + n_test], test_y=y[n:n + n_test], n_labeled_pool=n,
                    classes=[str(c) for c in range(10)], teacher_x=x[n + n_test:], teacher_y=y[n + n_test:])
    if args.dataset.startswith('cifar'):
        (x, y, classes), (tx, ty, _) = (load_cifar(args.dataset, args.data_dir, t) for t in (True, False))
        return dict(train_x=x, train_y=y, test_x=tx, test_y=ty, classes=classes, n_labeled_pool=len(x))
    unl = [('--unlabeled-dir', args.unlabeled_dir)] if args.unlabeled_dir else []
    x, y, classes, names = load_folders([('--train-dir', args.train_dir)] + unl, args)
    tx, ty, _, _ = load_folders([('--test-dir', args.test_dir)], args, classes)
    return dict(train_x=x, train_y=y, test_x=tx, test_y=ty, classes=classes, names=names,
                n_labeled_pool=int((y >= 0).sum()))

def parse_labels(spec):
    """'10pct' -> ('pct', 10.0); '400' -> ('count', 400); 'all' -> ('all', 1). Raises Abort on nonsense."""
    s = str(spec).strip().lower()
    try:
        kind, v = ('all', 1) if s == 'all' else ('pct', float(s[:-3])) if s.endswith('pct') else ('count', int(s))
        assert 0 < v and (kind != 'pct' or v <= 100)
        return kind, v
    except (ValueError, AssertionError):
        raise Abort(f"--labels {spec!r}: expected a percentage in (0, 100] ('10pct'), a positive count ('400') "
                    f"or 'all'") from None

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

def read_labeled_list(path, names):
    """--labeled-list: a training image per line, by file name ('n01440764_10026.JPEG', as the published ImageNet
    subsets) or path under --train-dir ('n01440764/n01440764_10026.JPEG') -> sorted long indices into names."""
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

def epoch_plan(idx, batch, steps, gen, pad):
    """`steps` batches of ids from back-to-back permutations of idx, with crop offsets (0..2*pad) and flips: long
    (steps, batch, 4) on the CPU, from `gen` alone, so any device and number of processes sees the same views."""
    n = steps * batch
    ids = torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(math.ceil(n / len(idx)))])[:n]
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

# ================================================================ models
def create_model(name, num_classes, res, pretrained, weights, kwargs, role):
    """A timm model (pretrained from the hub or a file, or random; ViTs built for `res`); failures name the flag."""
    if not timm.is_model(name):
        raise Abort(f"--{role}: unknown timm model {name!r} (list them with timm.list_models('*pattern*'))")
    kw = dict(num_classes=num_classes, pretrained=pretrained or bool(weights), **kwargs)
    if weights:
        kw['pretrained_cfg_overlay'] = dict(file=weights, source='timm')
    elif pretrained and not offline():  # hub unreachable: use the local cache only, failing now, not after retries
        from huggingface_hub import constants
        try:
            socket.create_connection((constants.ENDPOINT.split('/')[2], 443), timeout=3).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        try:
            return timm.create_model(name, img_size=res, **kw)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
            return timm.create_model(name, **kw)
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if weights:
            raise Abort(f'--{role}-weights {weights}: timm cannot load it ({why})') from None
        if pretrained:
            raise Abort(f'could not load pretrained weights for {name} ({type(e).__name__}): offline? use '
                        f'--no-pretrained, or a local file with --teacher-weights/--student-weights FILE; '
                        f'HF_HUB_OFFLINE=1 uses only the local hub cache') from None
        raise Abort(f'--{role} {name} with --{role}-kwargs {json.dumps(kwargs)}: {why}') from None

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

def build(args, num_classes, device, teacher=None, student=None):
    """Models (the teacher if a feature loss needs it), projectors, views and the DDP-wrapped, compiled forwards."""
    use_teacher = args.w_custom > 0 or args.w_general > 0
    if student is None:
        student = create_model(args.student, num_classes, args.student_res, args.pretrained, args.student_weights,
                               json.loads(args.student_kwargs), 'student')
    if use_teacher and teacher is None:
        teacher = create_model(args.teacher, 0, args.teacher_res, args.pretrained, args.teacher_weights,
                               json.loads(args.teacher_kwargs), 'teacher')
    bf16 = args.precision == 'bf16' or (args.precision == 'auto' and device.type == 'cuda')
    fmt = dict(memory_format=torch.channels_last) if bf16 else {}  # channels_last follows the precision switch
    kd = SimpleNamespace(student=student.to(device, **fmt), head=student.get_classifier(), device=device, bf16=bf16,
                         teacher=None, proj_custom=None, proj_general=None, head_c=None, cache_train=None,
                         cache_test=None, amp=partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16))
    for role, model in (('student', student), ('teacher', teacher))[:1 + use_teacher]:
        res = getattr(args, f'{role}_res')
        try:  # shapes from a dummy forward, in eval mode so BatchNorm statistics stay untouched
            with torch.no_grad():
                x = torch.zeros(1, 3, res, res, device=device)
                setattr(kd, f'd_{role[0]}', features(model.to(device, **fmt).eval(), x).shape[1])    # d_s, d_t
        except Exception as e:
            raise Abort(f"--{role} cannot take --{role}-res {res}: {(str(e).splitlines() or [''])[0]}") from None
    if kd.head(torch.zeros(1, kd.d_s, device=device)).shape[-1] != num_classes:
        raise Abort(f'the student head must output {num_classes} classes')
    compiled = torch.compile if args.compile else (lambda f: f)
    kd.view_s = model_view(student, args.student_res, device, bf16)
    if use_teacher:
        kd.teacher = teacher.eval().requires_grad_(False)                                    # frozen, always
        kd.view_t, kd.feat_t = model_view(teacher, args.teacher_res, device, bf16), compiled(partial(features, teacher))
    if args.w_custom > 0:  # [CustomKD] P_c: d_t -> d_s, the customization projector (paper θ_t^h)
        # P_c(f_t) is a *target for f_s*, so it ends where f_s ends (a gap the paper leaves): timm's MobileNetV3
        # pre-logits come out of `act2` (Hardswish, min -0.375) after `conv_head`; other students: identity.
        act = getattr(student, 'act2', None)
        end = type(act)() if args.proj_act == 'auto' and hasattr(student, 'conv_head') and isinstance(act, nn.Module) \
            else nn.Identity()
        kd.proj_custom = nn.Sequential(nn.Linear(kd.d_t, kd.d_s), end).to(device)
        kd.head_c = kd.head if args.custom_head == 'student' else \
            nn.Linear(kd.d_s, num_classes).to(device).requires_grad_(False)                  # ablation: random head
    if args.w_general > 0:  # P_g: d_s -> d_t, the general projector on the student side
        kd.proj_general = nn.Linear(kd.d_s, kd.d_t).to(device)
    # Under torchrun, DDP averages gradients over the parameters that require grad when it is built.
    ddp = partial(nn.parallel.DistributedDataParallel, forward_sync_buffers=False) if RUN.world > 1 else (lambda m: m)
    if kd.proj_custom is not None:
        set_stage(kd, 1)
        kd.customizer = ddp(nn.Sequential(kd.proj_custom, kd.head_c))                         # f_t -> h(P_c(f_t))
    set_stage(kd, 2)
    kd.student_side = compiled(ddp(StudentSide(student, kd.proj_general)))
    return kd

def train_demo_teacher(kd, x, y, steps, seed):
    """Demo only, offline stand-in for a pretrained foundation model: the random-init teacher first learns for a
    few seconds, through a temporary linear head, from generated labeled images of its own (never the student's)."""
    teacher = kd.teacher.train().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):  # the same demo teacher whichever projectors were built before
        torch.manual_seed(seed)
        head = nn.Linear(kd.d_t, int(y.max()) + 1).to(kd.device)
    opt = torch.optim.Adam(list(teacher.parameters()) + list(head.parameters()), lr=1e-3)
    for plan in epoch_plan(torch.arange(len(x)), 64, steps, torch.Generator().manual_seed(seed), x.shape[-1] // 8):
        with kd.amp():
            logits = head(features(teacher, kd.view_t(augment(x, plan, kd.device))))
        take_step(opt, F.cross_entropy(logits.float(), y[plan[:, 0]].to(kd.device)))
    teacher.eval().requires_grad_(False)                                                     # frozen from now on
    for p in teacher.parameters() if RUN.world > 1 else []:  # every rank keeps rank 0's (GPU kernels may differ)
        dist.broadcast(p.data, 0)

def teacher_forward(kd, x):
    """f_t for a float image batch, under inference mode; cloned so that autograd may save it."""
    with torch.inference_mode(), kd.amp():
        f_t = kd.feat_t(kd.view_t(x))                                                         # (B, d_t)
    return f_t.clone()

def teacher_features(kd, pool, plan, x=None):
    """f_t of a planned batch: from --teacher-cache (the planned flip picks the view), else of its images x."""
    if kd.cache_train is not None:
        return fetch(kd.cache_train, plan[:, 0] * 2 + plan[:, 3], kd.device).float()        # (B, d_t)
    return teacher_forward(kd, augment(pool, plan, kd.device) if x is None else x)

def build_teacher_cache(kd, pool, x_test, batch, with_train):
    """Teacher features, once, over the ranks: test images; with --teacher-cache training images plain and flipped."""
    dtype = torch.bfloat16 if kd.bf16 else torch.float32
    def rows(x, views, i, j):  # -> (j - i, views, d_t)
        v = x[i:j].to(kd.device).float()
        return torch.stack([teacher_forward(kd, v.flip(-1) if flip else v) for flip in range(views)], 1).to(dtype)
    for name, x, views in [('cache_test', x_test, 1)] + [('cache_train', pool, 2)] * with_train:
        place = kd.device if fits(len(x) * views * kd.d_t * dtype.itemsize, kd.device) else torch.device('cpu')
        out = sharded_rows(len(x), batch, partial(rows, x, views), kd.device, place, f'teacher features ({name})')
        setattr(kd, name, out.flatten(0, 1))                                  # (N_test, d_t) and (2 N, d_t)

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
    """One optimizer step on `loss` (SGD for the student side, Adam for P_c); under DDP, averaged gradients."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

def global_batch(batch, n):
    """The global batch: at most the n images, split evenly over the processes."""
    if min(batch, n) < RUN.world:
        raise Abort(f'a batch of {min(batch, n)} images cannot be split over {RUN.world} processes')
    return min(batch, n) // RUN.world * RUN.world

class Meter:
    """Device-side sums of the loss terms and the first step each went non-finite at: no host sync per step."""
    def __init__(self, steps, device):
        self.steps, self.sums, self.bad, self.never = steps, {}, {}, torch.tensor(steps, device=device)
    def add(self, step, terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
            self.bad[k] = torch.minimum(self.bad.get(k, self.never), torch.where(v.isfinite(), self.steps, step))
    def result(self):  # -> means over steps and ranks, the term(s) that went non-finite first
        bad = {k: int(all_reduce(v, dist.ReduceOp.MIN)) for k, v in self.bad.items()}
        culprits = [k for k, v in bad.items() if v == min(bad.values()) < self.steps]
        return {k: (all_reduce(v) / RUN.world / self.steps).item() for k, v in self.sums.items()}, culprits

def customize_epoch(kd, pool, y_pool, labeled_idx, batch, opt, gen):
    """[CustomKD] Stage 1, feature customization: one pass over D_L that trains only P_c, through the head h."""
    set_stage(kd, 1)
    batch = global_batch(batch, len(labeled_idx))
    plan = epoch_plan(labeled_idx, batch, len(labeled_idx) // batch, gen, pool.shape[-1] // 8)
    meter = Meter(len(plan), kd.device)
    for s, p in enumerate(progress(plan, 'stage 1', len(plan) * batch, batch)):
        p = shard(p)                                                       # this rank's share
        f_t = teacher_features(kd, pool, p)                                                   # (B, d_t)
        with kd.amp():
            logits = kd.customizer(f_t)                                    # [CustomKD] (B, C): h(P_c(f_t))
        loss = loss_customize(logits, fetch(y_pool, p[:, 0], kd.device))  # [CustomKD]
        take_step(opt, loss)
        meter.add(s, {'loss/customize': loss})
    return meter.result(), len(plan) * batch

def distill_step(kd, x, y_l, f_t):
    """[CustomKD] Stage 2, distillation: the four terms on one batch x = [x_l; x_u]. Returns {log key: term}."""
    n_l = len(y_l)
    with kd.amp():
        f_s, logits, f_s_projected = kd.student_side(kd.view_s(x))        # (B, d_s), (B, C), (B, d_t) or None
        terms = {'loss/sup': loss_sup(logits[:n_l], y_l),                  # [CustomKD] L_L on D_L
                 'loss/entropy': loss_entropy(logits[n_l:])}               # [CustomKD] L_U on D_U
        if kd.proj_custom is not None:
            with torch.no_grad():
                f_t_custom = kd.proj_custom(f_t)                                              # (B, d_s), P_c frozen
            terms['loss/feat_custom'] = loss_feat_custom(f_s, f_t_custom)                    # [CustomKD] L_f~t
        if f_s_projected is not None:
            terms['loss/feat_general'] = loss_feat_general(f_s_projected, f_t)               # [CustomKD] L_ft
    return terms

def distill_epoch(kd, pool, y_pool, labeled_idx, unlabeled_idx, args, opt, weights, epoch, gen):
    """One pass over D_U; each step also takes a batch of D_L (cycled). -> (means, culprits), #images"""
    set_stage(kd, 2)
    b_l, b_u = global_batch(args.batch_size, len(labeled_idx)), global_batch(args.mu * args.batch_size,
                                                                             len(unlabeled_idx))
    steps, pad = len(unlabeled_idx) // b_u, pool.shape[-1] // 8
    plans = zip(epoch_plan(labeled_idx, b_l, steps, gen, pad), epoch_plan(unlabeled_idx, b_u, steps, gen, pad))
    meter = Meter(steps, kd.device)
    for s, (plan_l, plan_u) in enumerate(progress(plans, 'stage 2', steps * (b_l + b_u), b_l + b_u)):
        for group in opt.param_groups:  # cosine decay over all stage-2 steps of the run
            group['lr'] = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + s) / (args.epochs * steps)))
        plan_l = shard(plan_l)
        p = torch.cat([plan_l, shard(plan_u)])                             # this rank's share of [x_l; x_u]
        x = augment(pool, p, kd.device)                                    # the same view for teacher and student
        f_t = teacher_features(kd, pool, p, x) if kd.teacher is not None else None            # (B, d_t), no grad
        terms = distill_step(kd, x, fetch(y_pool, plan_l[:, 0], kd.device), f_t)
        take_step(opt, sum(weights[k] * v for k, v in terms.items()))     # [CustomKD] the weighted sum
        meter.add(s, terms)
    for b in kd.student.buffers():  # BatchNorm running statistics: per rank in an epoch, averaged at its end
        if RUN.world > 1 and b.is_floating_point():
            b.copy_(all_reduce(b.clone()) / RUN.world)
    return meter.result(), steps * (b_l + b_u)

# ================================================================ evaluation
@torch.no_grad()
def evaluate(kd, x_test, y_test, batch, cka_idx):
    """Test accuracy of the student and of h(P_c(f_t)) (sharded over ranks); linear CKA of f_s with f~_t and f_t."""
    kd.student.eval()
    with kd.amp():
        f_s = sharded_rows(len(x_test), batch, lambda i, j: kd.student_side(kd.view_s(
            x_test[i:j].to(kd.device).float()))[0].float(), kd.device, kd.device, 'evaluation')  # (N, d_s)
    out = {'acc/student': (kd.head(f_s).argmax(-1) == y_test).float().mean().item()}
    if kd.teacher is None:
        return out
    others = {'cka/student_vs_teacher': kd.cache_test.float().to(kd.device)}                 # f_t: (N, d_t)
    if kd.proj_custom is not None:
        others['cka/student_vs_custom'] = f_t_custom = kd.proj_custom(others['cka/student_vs_teacher'])
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

def console_line(row, epochs):
    def f(key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else '-'.rjust(len(fmt.format(0.0)))
    return (f"epoch {row['epoch']:3d}/{epochs} | cust {f('loss/customize', '{:6.3f}')} | "
            f"feat_c {f('loss/feat_custom', '{:7.4f}')} feat_g {f('loss/feat_general', '{:7.4f}')} "
            f"sup {f('loss/sup', '{:6.3f}')} ent {f('loss/entropy', '{:6.3f}')} | acc {f('acc/student', '{:.4f}')} "
            f"teacher_custom {f('acc/teacher_custom', '{:.4f}')} | cka {f('cka/student_vs_custom', '{:.3f}')}/"
            f"{f('cka/student_vs_teacher', '{:.3f}')} | {f('time/distill_s', '{:7.1f}')}s "
            f"{f('throughput/distill_img_s', '{:7.0f}')} img/s {f('mem/peak_mb', '{:7.0f}')} MB")

def say(line):
    if RUN.rank == 0:
        print(line, flush=True)

def clock(device):
    """Seconds, after the device has finished its queued work."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()

# ================================================================ main
def setup(args, teacher=None, student=None):
    """Everything before the first epoch: process, data, models, split, optimizers, state, run directory, cache."""
    r = SimpleNamespace(args=args, t_start=time.time(), start=0, history=[], wall=0.0)
    r.device = device = init_process(args)
    if teacher is not None or student is not None:  # your own modules: recorded by class name
        args.teacher, args.student = (type(m).__name__ if m is not None else n
                                      for m, n in ((teacher, args.teacher), (student, args.student)))
    r.identity, r.ckpt_path = {k: getattr(args, k) for k in IDENTITY}, os.path.join(args.out_dir, 'checkpoint.pt')
    ckpt = load_checkpoint(r.ckpt_path, r.identity) if args.resume else None
    if RUN.rank == 0 and not args.resume and os.path.isdir(args.out_dir) and os.listdir(args.out_dir) \
            and not args.overwrite:
        raise Abort(f'run directory {args.out_dir} exists: add --resume to continue it, --overwrite to replace it, '
                    f'or choose another --out-dir')
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA lacks a few kernels
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.manual_seed(args.seed)
    RUN.phase = 'data'  # CIFAR and the demo load in seconds; a folder is decoded after the models are built
    data = load_data(args) if args.dataset != 'folder' else None
    RUN.phase, r.num_classes = 'model', len(data['classes'] if data else class_folders(args.train_dir)[0])
    kd = r.kd = build(args, r.num_classes, device, teacher, student)
    RUN.phase, data = 'data', data or load_data(args)
    n_pool = data['n_labeled_pool']
    r.labeled_idx = read_labeled_list(args.labeled_list, data['names'][:n_pool]) if args.labeled_list else \
        split_labeled(data['train_y'][:n_pool], args.labels, r.num_classes, args.split_seed)[0]
    r.unlabeled_idx = torch.arange(n_pool if n_pool < len(data['train_x']) else 0, len(data['train_x']))
    if ckpt is not None and not torch.equal(ckpt['labeled_idx'], r.labeled_idx):
        raise Abort("--resume: the labeled split differs from the checkpoint's (different data?)")
    r.x_pool, r.x_test = (x.to(device) if fits(x.numel(), device) else x for x in (data['train_x'], data['test_x']))
    r.y_pool, r.y_test = data['train_y'].to(device), data['test_y'].to(device)
    if kd.teacher is not None and args.demo_teacher_steps and args.dataset == 'synthetic' and teacher is None:
        train_demo_teacher(kd, data['teacher_x'], data['teacher_y'], args.demo_teacher_steps, args.seed)
    params = list(kd.student.parameters()) + (list(kd.proj_general.parameters()) if kd.proj_general else [])
    r.opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    r.opt_custom = torch.optim.Adam(kd.proj_custom.parameters(), lr=args.lr_custom) if kd.proj_custom else None
    r.parts = dict(student=kd.student, proj_custom=kd.proj_custom, proj_general=kd.proj_general, head_c=kd.head_c,
                   opt=r.opt, opt_custom=r.opt_custom)  # what a checkpoint holds besides counters and RNG states
    if ckpt is not None:
        for key, part in r.parts.items():
            if part is not None:
                part.load_state_dict(ckpt[key])
        r.start, r.history, r.wall = ckpt['epoch'], ckpt['history'], ckpt['wall_time_s']
        torch.set_rng_state(ckpt['rng_cpu'])
        if device.type == 'cuda' and ckpt['rng_cuda']:
            torch.cuda.set_rng_state_all(ckpt['rng_cuda'])
    RUN.phase, r.metrics_path = 'saving', os.path.join(args.out_dir, 'metrics.jsonl')
    if RUN.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        save_atomic(json.dumps(vars(args), indent=2) + '\n', os.path.join(args.out_dir, 'args.json'))
        save_atomic(''.join(json.dumps(row) + '\n' for row in r.history), r.metrics_path)  # the checkpoint's rows
        for name in ('summary.json',) if args.resume else ('summary.json', 'checkpoint.pt', 'student.pt'):
            if os.path.exists(os.path.join(args.out_dir, name)):  # --overwrite: nothing of the old run survives
                os.remove(os.path.join(args.out_dir, name))
    RUN.phase, t, r.batch_eval = 'teacher cache', clock(device), args.batch_size * (1 + args.mu)
    if kd.teacher is not None:  # test features always (the teacher is frozen); train features with --teacher-cache
        build_teacher_cache(kd, r.x_pool, r.x_test, r.batch_eval, args.teacher_cache)
    r.time_cache = clock(device) - t
    r.cka_idx = torch.randperm(len(r.x_test), generator=torch.Generator().manual_seed(0))[:args.cka_samples]
    caches = [c for c in (kd.cache_train, kd.cache_test) if c is not None]
    gb, where = sum(c.numel() * c.element_size() for c in caches) / 1e9, caches[0].device.type if caches else '-'
    say(f"customkd: {args.dataset} {r.num_classes} classes, {len(r.labeled_idx)} labeled / {len(r.unlabeled_idx)} "
        f"unlabeled / {len(r.x_test)} test | student {args.student} | teacher {args.teacher if kd.teacher else 'none'}"
        f" | {device.type} x {RUN.world}, {'bf16' if kd.bf16 else 'fp32'}, images on {r.x_pool.device.type} | "
        f'teacher features {gb:.2f} GB on {where} in {r.time_cache:.1f}s | out {args.out_dir}')
    return r

def timed_stage(r, row, epoch, stage, fn, *a):
    """One stage of one epoch with its own data plan, seeded by (seed, epoch, stage) alone; time and images/s."""
    RUN.phase, t = f'stage {stage}', clock(r.device)
    (means, culprits), n_img = fn(*a, torch.Generator().manual_seed((r.args.seed << 32) + 2 * epoch + stage))
    key = 'customize' if stage == 1 else 'distill'
    row.update(means, **{f'time/{key}_s': clock(r.device) - t})
    row[f'throughput/{key}_img_s'] = n_img / row[f'time/{key}_s']
    if culprits:
        kept = f'the checkpoint of epoch {epoch} in {r.args.out_dir} is kept' if epoch else 'no checkpoint was written'
        raise Abort(f"{' and '.join(culprits)} became non-finite in epoch {epoch + 1}; stopped; {kept} (lower --lr "
                    f"or that loss weight{', then --resume' if epoch else ''})", code=3)

def save_epoch(r, row):
    """The epoch's row, an atomic checkpoint and the deployable student (rank 0 writes)."""
    RUN.phase = 'saving'
    if r.device.type == 'cuda':  # the epoch's peak CUDA allocations
        row['mem/peak_mb'] = torch.cuda.max_memory_allocated(r.device) / 2**20
        torch.cuda.reset_peak_memory_stats(r.device)
    else:  # the process's peak RSS so far (Linux: KiB)
        row['mem/peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r.history.append(row)
    if RUN.rank == 0:
        save_atomic(dict(identity=r.identity, epoch=row['epoch'], history=r.history, labeled_idx=r.labeled_idx,
                         wall_time_s=r.wall + time.time() - r.t_start, rng_cpu=torch.get_rng_state(),
                         rng_cuda=torch.cuda.get_rng_state_all() if r.device.type == 'cuda' else [],
                         **{k: p.state_dict() if p is not None else {} for k, p in r.parts.items()}), r.ckpt_path)
        save_atomic(dict(state_dict=r.kd.student.state_dict(), model=r.args.student, num_classes=r.num_classes),
                    os.path.join(r.args.out_dir, 'student.pt'))
        save_atomic(''.join(json.dumps(h) + '\n' for h in r.history), r.metrics_path)
    say(console_line(row, r.args.epochs))

def summarise(r):
    RUN.phase, last = 'saving', r.history[-1] if r.history else dict.fromkeys(METRIC_KEYS)
    best = max((row['acc/student'] for row in r.history if row['acc/student'] is not None), default=None)
    times = {k: sum(row[k] or 0.0 for row in r.history) for k in ('time/customize_s', 'time/distill_s', 'time/eval_s')}
    summary = dict(acc_student_last=last['acc/student'], acc_student_best=best,
                   acc_teacher_custom_last=last['acc/teacher_custom'], epochs=len(r.history),
                   num_labeled=len(r.labeled_idx), num_unlabeled=len(r.unlabeled_idx), num_train_images=len(r.x_pool),
                   world_size=RUN.world, wall_time_s=r.wall + time.time() - r.t_start, **times,
                   **{'time/teacher_cache_s': r.time_cache, 'mem/peak_mb': max(h['mem/peak_mb'] for h in r.history)},
                   args=vars(r.args))
    if RUN.rank == 0:
        save_atomic(json.dumps(summary, indent=2) + '\n', os.path.join(r.args.out_dir, 'summary.json'))
    say(f"customkd: last-epoch student accuracy {summary['acc_student_last']:.4f} (best epoch: {best:.4f}); "
        f"wall {summary['wall_time_s']:.0f}s; outputs in {r.args.out_dir}")
    return summary

def run(args, teacher=None, student=None):
    """The paper's algorithm: every epoch customizes the teacher (stage 1), then distils (stage 2)."""
    r = setup(args, teacher, student)
    kd, weights = r.kd, {'loss/feat_custom': args.w_custom, 'loss/feat_general': args.w_general,
                         'loss/sup': args.w_sup, 'loss/entropy': args.w_ent}
    for epoch in range(r.start, args.epochs):
        row = {**dict.fromkeys(METRIC_KEYS), 'epoch': epoch + 1}
        if kd.proj_custom is not None and epoch % args.custom_every == 0:  # [CustomKD] stage 1: customize P_c
            timed_stage(r, row, epoch, 1, customize_epoch, kd, r.x_pool, r.y_pool, r.labeled_idx, args.batch_size,
                        r.opt_custom)
        timed_stage(r, row, epoch, 2, distill_epoch, kd, r.x_pool, r.y_pool, r.labeled_idx,  # [CustomKD] stage 2:
                    r.unlabeled_idx, args, r.opt, weights, epoch)                             # distil
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            RUN.phase, t = 'evaluation', clock(r.device)
            row.update(evaluate(kd, r.x_test, r.y_test, r.batch_eval, r.cka_idx.to(r.device)))
            row['time/eval_s'] = clock(r.device) - t
        save_epoch(r, row)
    return summarise(r)

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
        fail(e, e.code)
    except KeyboardInterrupt:
        if RUN.rank > 0:
            raise SystemExit(130)
        fail("interrupted (Ctrl-C, SIGTERM, or torchrun ending the run after another process failed); the last "
             "completed epoch's checkpoint.pt is intact: rerun the same command with --resume", 130)
    except Exception as e:
        if os.environ.get('CUSTOMKD_DEBUG', '') not in ('', '0'):
            raise
        hint = {'data': 'check the dataset files, --data-dir and --cache-dir', 'model': 'check --teacher/--student',
                'saving': 'check space and permissions of --out-dir'}.get(RUN.phase, 'out of memory? lower '
                                                                          '--batch-size; else try --precision fp32')
        fail(f"unexpected {type(e).__name__} during {RUN.phase}: {' '.join(str(e).split())[:300]}; {hint}; "
             f'CUSTOMKD_DEBUG=1 shows the traceback', 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    main()
