"""customkd.py at the paper's scale: ImageNet 1 % / 10 %, DomainNet, OfficeHome, and caches that later runs reuse.

    python tools/large.py --dataset folder --train-dir imagenet/train --test-dir imagenet/val \\
        --labeled-list 1percent.txt --teacher-cache                # ImageNet 1 %, the published subset's file names
    python tools/large.py --dataset folder --train-dir domainnet/real --test-dir domainnet/clipart_test \\
        --unlabeled-dir domainnet/clipart                          # domain adaptation: D_U from another domain

Every flag of customkd.py, and the run is customkd.py's; this file adds, through its hooks (parse, data,
keep_features):
  - class folders decoded once, by --workers processes, into a memory-mapped uint8 array in --cache-dir, reused while
    the image files stay (the array's name hashes every file's path, size and modification time), so a run holds no
    copy in memory;
  - --labeled-list: the labeled images by name, instead of --labels; --unlabeled-dir: another folder is D_U;
  - --teacher-cache: the teacher's features kept in --cache-dir under a hash of all that decides them, read back by
    later runs (any seed, split or student).
"""

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from functools import partial

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402

ck.IDENTITY += ("labeled_list", "unlabeled_dir")  # --resume refuses a checkpoint written with other values


def build_parser():
    """customkd.py's parser, and the flags of the large settings."""
    p = ck.build_parser()
    add = p.add_argument_group("large settings (tools/large.py)").add_argument
    add("--labeled-list", help="folder dataset: file of training images, a name per line, labeled instead of --labels")
    add("--unlabeled-dir", help="folder dataset: class folders that are the unlabeled set instead (labels unread)")
    add("--workers", type=ck.num(int, 1, 1024), help="processes that decode a folder (default: all cores)")
    return p


def parse_args(argv=None):
    """customkd.parse_args with this file's flags, checked as customkd.py checks its own."""
    p = build_parser()
    args = ck.parse_args(argv, p)
    for k, is_dir in (("unlabeled_dir", True), ("labeled_list", False)):
        path = getattr(args, k)
        if path is not None and args.dataset != "folder":
            p.error(f"--{k.replace('_', '-')} is only for --dataset folder")
        if path is not None and not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
            p.error(f"--{k.replace('_', '-')} {path!r} is not an existing {'folder' if is_dir else 'file'}")
    return args


def load_data(args):
    """The data hook: folders listed and checked as customkd.py does, then mapped; other datasets as customkd.py."""
    if args.dataset != "folder":
        return ck.load_data(args)
    files, y, classes = ck.list_folder("--train-dir", args.train_dir)
    test_files, test_y, _ = ck.list_folder("--test-dir", args.test_dir, classes)
    ck.refuse_shared(args, files, test_files)
    data = dict(classes=classes, test_y=torch.tensor(test_y))
    if args.labeled_list:
        names = [os.path.relpath(f, os.path.abspath(args.train_dir)) for f in files]
        data["labeled_idx"] = read_labeled_list(args.labeled_list, names)
    if args.unlabeled_dir:  # the target domain, after the source; its labels are never read
        unlabeled = ck.list_folder("--unlabeled-dir", args.unlabeled_dir, classes)[0]
        data["unlabeled_idx"] = torch.arange(len(files), len(files) + len(unlabeled))
        files = files + unlabeled
        y = y + [-1] * len(unlabeled)
    data["train_y"] = torch.tensor(y)
    data["train_x"] = decode_folder(files, args)
    data["test_x"] = decode_folder(test_files, args)
    return data


def decode_folder(files, args):
    """Image files -> uint8 (N, 3, S, S) mapped from an array file, decoded once and reused while files and S stay.
    The file's name hashes every file's path, size and modification time, so a changed image is decoded again."""
    n, size = len(files), args.image_size
    nbytes = n * 3 * size * size
    stats = [(f, st.st_size, st.st_mtime_ns) for f, st in zip(files, map(os.stat, files))]
    key = hashlib.sha1(json.dumps([stats, size]).encode()).hexdigest()[:16]
    folder = os.path.basename(os.path.dirname(os.path.dirname(files[0])))
    path = os.path.join(args.cache_dir, f"{folder}-{size}px-{key}.u8")
    while int(os.environ.get("LOCAL_RANK", 0)) > 0 and not (os.path.exists(path) and os.path.getsize(path) == nbytes):
        time.sleep(1)  # one process per machine decodes; the others wait for the file
    if not (os.path.exists(path) and os.path.getsize(path) == nbytes):  # new, or cut short (a full disk, a bad copy)
        os.makedirs(args.cache_dir, exist_ok=True)
        free = shutil.disk_usage(args.cache_dir).free
        if nbytes > free:  # now: a full disk mid-decode kills the process
            raise ck.Abort(
                f"{n} images at {size} px need {nbytes / 1e9:.1f} GB in --cache-dir: {free / 1e9:.1f} GB free"
            )
        ck.say(f"customkd: decoding {n} images to {size} px, once, into {path}")
        tmp = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
        try:
            out = torch.from_file(tmp, shared=True, size=nbytes, dtype=torch.uint8).view(n, 3, size, size)
            decode_into(out, files, args)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return torch.from_file(path, size=nbytes, dtype=torch.uint8).view(n, 3, size, size)


def decode_into(out, files, args):
    """Decodes files into out (N, 3, S, S) with --workers processes (customkd.decode each), progress once a minute;
    every unreadable file named as customkd.py names them."""
    workers = args.workers or len(os.sched_getaffinity(0))
    gen = torch.Generator()  # its own: a decode leaves the seeded global generator where it was
    decode = partial(ck.decode, args.image_size)
    loader = torch.utils.data.DataLoader(files, 256, num_workers=workers, collate_fn=decode, generator=gen)
    bad = []
    t0 = shown = time.time()
    for i, (x, unreadable) in enumerate(loader):
        out[i * 256 : i * 256 + len(x)] = x
        bad += unreadable
        if time.time() - shown > 60:
            shown = time.time()
            done = i * 256 + len(x)
            ck.say(f"decoding: {done}/{len(files)}, {done / (shown - t0):.0f}/s")
    ck.refuse_unreadable(bad, args)


def read_labeled_list(path, names):
    """--labeled-list: training images by file name (as the published ImageNet subsets) or class/file -> indices."""
    where = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):  # a bare file name, unless two folders hold one of that name
        base = os.path.basename(name)
        where[base] = None if where.get(base, i) != i else i
    with open(path, errors="replace") as f:
        wanted = [line.strip() for line in f if line.strip()]
    if not wanted:
        raise ck.Abort(f"--labeled-list {path}: no names in it")
    missing = [w for w in wanted if where.get(w) is None]
    if missing:
        e_g = f"e.g. {missing[0]!r}"
        raise ck.Abort(f"--labeled-list {path}: {len(missing)} name(s) are not in --train-dir or are ambiguous, {e_g}")
    return torch.tensor(sorted({where[w] for w in wanted}))


def keep_features(kd, make):
    """The teacher-features hook: kept in --cache-dir under a hash of the teacher's name, arguments, weights and
    buffers, input side and normalisation, the precision and the images, so that nothing stale is ever reused;
    computed by make() when no file matches."""
    cfg = timm.data.resolve_model_data_config(kd.teacher)
    dtype = torch.bfloat16 if kd.bf16 else torch.float32
    about = [kd.args.teacher, kd.args.teacher_kwargs, kd.args.teacher_res, cfg["mean"], cfg["std"], str(dtype)]
    about.append("pre-logits of each image and its mirror image")
    arrays = []
    for x in (kd.x_pool, kd.x_test):  # a mapped array (decode_folder's) by its file's name, others by their bytes
        mapped = x.untyped_storage().filename if x.device.type == "cpu" else None
        about.append(os.path.basename(mapped) if mapped else "in memory")
        if not mapped:
            arrays.append(x)
    digest = ck.fingerprint(about, kd.teacher, *arrays)
    name = f"teacher-{re.sub(r'[^0-9A-Za-z]', '_', kd.args.teacher)}-{kd.args.teacher_res}px-{digest}.pt"
    path = os.path.join(kd.args.cache_dir, name)
    shapes = {"cache_train": (2 * len(kd.x_pool), kd.d_t), "cache_test": (len(kd.x_test), kd.d_t)}
    try:  # no file, a file cut short, other shapes: made anew. weights_only: never runs pickled code; mmap: as used
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        assert {k: v.shape for k, v in saved.items()} == shapes
        ck.say(f"customkd: teacher features read from {path}, made by an earlier run")
        return saved
    except Exception:
        pass
    ck.say(f"customkd: teacher features, once, into {path}")
    saved = make()  # every process makes them (no collective), rank 0 writes them
    if ck.PROC.rank == 0:
        ck.save_atomic(saved, path)
    return saved


def main(argv=None, teacher=None, student=None):
    """customkd.main with this file's hooks. -> the summary dict"""
    return ck.main(argv, teacher, student, parse=parse_args, data=load_data, keep_features=keep_features)


def setup(argv, teacher=None, student=None):
    """customkd.setup with this file's hooks: a run's state before its first epoch (the scripts in tools/ use it)."""
    return ck.setup(parse_args(argv), teacher, student, data=load_data, keep_features=keep_features)


if __name__ == "__main__":
    main()
