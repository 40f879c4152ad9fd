"""Tests for customkd.py: CPU only, no network (HF_HUB_OFFLINE=1), tiny random-init models, generated data.

Run: HF_HUB_OFFLINE=1 python -m pytest -q test_customkd.py
"""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # before timm / huggingface_hub are imported

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import customkd as ck

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device('cpu')
TINY = ['--dataset', 'synthetic', '--synthetic-size', '200', '--epochs', '2', '--cka-samples', '40']
VOLATILE = ('time/', 'throughput/', 'mem/')  # wall-clock measurements differ between runs by nature
WEIGHTS = {'loss/feat_custom': 1.0, 'loss/feat_general': 1.0, 'loss/sup': 1.0, 'loss/entropy': 1.0}  # all four stage-2 terms on


def run_main(argv, capsys=None, **kw):
    """main() -> (exit code, summary or None, stderr)."""
    try:
        out = ck.main(argv, **kw)
        code = 0
    except SystemExit as e:
        out, code = None, e.code
    err = capsys.readouterr().err if capsys else ''
    return code, out, err


def rows(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in f]


def tiny_parts(tmp_path, *extra):
    args = ck.parse_args(TINY + ['--out-dir', str(tmp_path / 'run'), *extra])
    torch.manual_seed(0)
    data = ck.load_data(args)
    kd = ck.build(args, 10, CPU)
    lab, unl = ck.split_labeled(data['train_y'], args.labels, 10, 0)
    return args, data, kd, lab, unl


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(module, snap):
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


# ------------------------------------------------------------------ labeled split
CIFAR_Y = torch.arange(50000) % 100


def test_split_10pct_and_400_are_class_balanced():
    for labels, per_class in (('10pct', 50), ('400', 4), ('1pct', 5)):
        lab, unl = ck.split_labeled(CIFAR_Y, labels, 100, seed=0)
        assert lab.dtype == unl.dtype == torch.long and lab.dim() == unl.dim() == 1
        assert len(lab) == 100 * per_class and len(lab.unique()) == len(lab)
        assert torch.equal(torch.bincount(CIFAR_Y[lab], minlength=100), torch.full((100,), per_class))
        assert torch.equal(unl, torch.arange(50000))  # the unlabeled set is the whole training set
    all_lab, _ = ck.split_labeled(CIFAR_Y, 'all', 100, seed=0)
    assert torch.equal(all_lab, torch.arange(50000))


def test_split_is_seeded():
    a, b, c = (ck.split_labeled(CIFAR_Y, '400', 100, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize('spec', ['ten', '0', '0pct', '150pct', '-5', '401', '40000000', '10 pct%'])
def test_split_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match='--labels'):
        ck.split_labeled(CIFAR_Y, spec, 100, seed=0)


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
    assert ck.loss_entropy(torch.tensor([[0.0, math.log(3)], [5.0, 5.0]])).item() == pytest.approx((h + math.log(2)) / 2, rel=1e-6)
    assert ck.loss_entropy(torch.zeros(3, 7)).item() == pytest.approx(math.log(7), rel=1e-6)


def test_linear_cka_values_and_invariances():
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [4.0]])
    assert ck.linear_cka(x, y) == pytest.approx(81 / 84)  # 1-d CKA = squared correlation, by hand
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    b = b + a[:, :5]
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    base = ck.linear_cka(a, b)
    assert 0 < base < 1 and ck.linear_cka(a, a) == pytest.approx(1.0)
    assert ck.linear_cka(3.7 * a, b) == pytest.approx(base)          # isotropic scaling
    assert ck.linear_cka(a @ q, b) == pytest.approx(base)            # orthogonal rotation
    assert ck.linear_cka(a + 5.0, b) == pytest.approx(base)          # translation (centred)
    assert ck.linear_cka(a, torch.randn(50, 3, generator=g)) < 0.5


# ------------------------------------------------------------------ the two stages
def test_stage1_changes_only_the_customization_projector(tmp_path):
    args, data, kd, lab, _ = tiny_parts(tmp_path)
    before = {m: snapshot(getattr(kd, m)) for m in ('teacher', 'student', 'proj_general', 'proj_custom')}
    calls = []
    hook = kd.student.get_classifier().register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.Adam(kd.proj_custom.parameters(), lr=1e-2)
    loss, n_img = ck.customize_epoch(kd, data['train_x'], data['train_y'], lab, 8, opt)
    hook.remove()
    assert math.isfinite(loss) and n_img == 16 and len(calls) == 2  # 20 labeled, batch 8 -> 2 steps, each through h
    assert kd.head_c is kd.student.get_classifier()
    for m in ('teacher', 'student', 'proj_general'):
        assert same(getattr(kd, m), before[m]), m
    assert not same(kd.proj_custom, before['proj_custom'])


def test_random_custom_head_is_not_the_student_head(tmp_path):
    args, data, kd, lab, _ = tiny_parts(tmp_path, '--custom-head', 'random')
    assert kd.head_c is not kd.head and not any(p.requires_grad for p in kd.head_c.parameters())
    calls, rnd = [], snapshot(kd.head_c)
    kd.head.register_forward_hook(lambda *a: calls.append('student'))
    kd.head_c.register_forward_hook(lambda *a: calls.append('random'))
    ck.customize_epoch(kd, data['train_x'], data['train_y'], lab, 8, torch.optim.Adam(kd.proj_custom.parameters()))
    assert calls == ['random', 'random'] and same(kd.head_c, rnd)


def test_stage2_never_changes_teacher_or_customization_projector(tmp_path):
    args, data, kd, lab, unl = tiny_parts(tmp_path)
    before = {m: snapshot(getattr(kd, m)) for m in ('teacher', 'proj_custom', 'student', 'proj_general')}
    params = list(kd.student.parameters()) + list(kd.proj_general.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    weights = WEIGHTS
    terms, n_img, culprits = ck.distill_epoch(kd, data['train_x'], data['train_y'], lab, unl, args, opt, 0, weights)
    assert culprits == [] and set(terms) == set(weights) and all(math.isfinite(v) for v in terms.values())
    assert n_img == 4 * (16 + 48)  # 200 unlabeled // 48 = 4 steps of 16 labeled + 48 unlabeled
    assert same(kd.teacher, before['teacher']) and same(kd.proj_custom, before['proj_custom'])
    assert not same(kd.student, before['student']) and not same(kd.proj_general, before['proj_general'])
    assert not same(kd.head, {k.split('classifier.')[1]: v for k, v in before['student'].items() if 'classifier.' in k})
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())


def test_projector_ends_with_student_activation(tmp_path):
    _, _, kd, _, _ = tiny_parts(tmp_path)
    assert isinstance(kd.proj_custom[1], nn.Hardswish) and kd.proj_custom[0].in_features == 192
    assert kd.proj_custom[0].out_features == kd.head.in_features == kd.proj_general.in_features
    _, _, kd, _, _ = tiny_parts(tmp_path, '--proj-act', 'none')
    assert isinstance(kd.proj_custom[1], nn.Identity)


def test_teacher_cache_equals_fresh_features(tmp_path):
    _, data, kd, _, _ = tiny_parts(tmp_path)
    x = data['train_x'][:30]
    ck.build_teacher_cache(kd, x, data['test_x'][:10], batch=8)
    assert kd.cache_train.shape == (30, 2, 192) and kd.cache_test.shape == (10, 192)
    plain, flipped = (ck.teacher_forward(kd, v.float()) for v in (x, x.flip(-1)))
    assert torch.allclose(kd.cache_train[:, 0].float(), plain, rtol=2e-2, atol=2e-2)
    assert torch.allclose(kd.cache_train[:, 1].float(), flipped, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(plain, flipped, rtol=2e-2, atol=2e-2)
    idx, flip = torch.tensor([3, 4, 5]), torch.tensor([True, False, True])
    got = ck.teacher_features(kd, None, idx, flip)  # the student's flip picks the cached view
    assert torch.equal(got, torch.stack([kd.cache_train[3, 1], kd.cache_train[4, 0], kd.cache_train[5, 1]]).float())


def test_with_the_cache_no_stage_and_no_evaluation_runs_the_teacher(tmp_path):
    args, data, kd, lab, unl = tiny_parts(tmp_path)
    ck.build_teacher_cache(kd, data['train_x'], data['test_x'], batch=64)
    assert kd.cache_train.dtype == kd.cache_test.dtype == torch.bfloat16
    def teacher_ran(x):
        raise AssertionError('the teacher ran')
    kd.feat_t = teacher_ran
    weights = WEIGHTS
    opt = torch.optim.SGD(list(kd.student.parameters()) + list(kd.proj_general.parameters()), lr=0.01)
    ck.customize_epoch(kd, data['train_x'], data['train_y'], lab, 8, torch.optim.Adam(kd.proj_custom.parameters()))
    ck.distill_epoch(kd, data['train_x'], data['train_y'], lab, unl, args, opt, 0, weights)
    out = ck.evaluate(kd, data['test_x'], data['test_y'], 64, torch.arange(40))
    assert set(out) == {'acc/student', 'acc/teacher_custom', 'cka/student_vs_custom', 'cka/student_vs_teacher'}


def test_augment_crops_and_flips_on_the_batch():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).to(torch.uint8)
    torch.manual_seed(0)
    out, flip = ck.augment(x)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and flip.shape == (2,)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode='reflect')
    for b in range(2):
        ref = out[b].flip(-1) if flip[b] else out[b]
        assert any(torch.equal(padded[b, :, i:i + 8, j:j + 8], ref) for i in range(9) for j in range(9))


# ------------------------------------------------------------------ end to end
def test_synthetic_run_writes_every_output_and_learns(tmp_path, capsys):
    out = tmp_path / 'run'
    code, summary, _ = run_main(['--dataset', 'synthetic', '--out-dir', str(out)], capsys)  # the offline demo as shipped
    assert code == 0
    assert sorted(os.listdir(out)) == ['args.json', 'checkpoint.pt', 'metrics.jsonl', 'student.pt', 'summary.json']
    lines = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['epoch'] for r in lines] == [1, 2, 3, 4, 5]
    assert set(lines[-1]) == set(ck.METRIC_KEYS) and all(lines[-1][k] is not None for k in ck.METRIC_KEYS)
    assert summary['acc_student_last'] == lines[-1]['acc/student'] > 0.5  # chance is 0.1
    assert summary['acc_student_best'] == max(r['acc/student'] for r in lines)
    assert lines[-1]['loss/feat_general'] < lines[0]['loss/feat_general']  # a healthy run: feature loss falls
    assert summary['num_labeled'] == 160 and summary['num_unlabeled'] == 1600 and summary['epochs'] == 5
    assert json.load(open(out / 'summary.json'))['acc_student_last'] == summary['acc_student_last']
    assert json.load(open(out / 'args.json'))['labels'] == '10pct'
    student = torch.load(out / 'student.pt', weights_only=True)
    assert student['model'] == 'mobilenetv3_small_050' and student['num_classes'] == 10
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ckpt['epoch'] == 5 and 'teacher' not in ckpt and len(ckpt['labeled_idx']) == 160


def test_console_prints_one_aligned_line_per_epoch(tmp_path, capsys):
    code, _, _ = run_main(TINY + ['--epochs', '3', '--out-dir', str(tmp_path / 'r')])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch')]
    assert code == 0 and len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert [line.index('|') for line in lines] == [lines[0].index('|')] * 3


def test_baseline_without_feature_losses_never_builds_the_teacher(tmp_path, monkeypatch):
    built = []
    real = ck.create_model
    monkeypatch.setattr(ck, 'create_model', lambda name, *a, **k: built.append(name) or real(name, *a, **k))
    code, summary, _ = run_main(TINY + ['--w-custom', '0', '--w-general', '0', '--out-dir', str(tmp_path / 'b')])
    assert code == 0 and built == ['mobilenetv3_small_050']
    row = json.loads(open(tmp_path / 'b' / 'metrics.jsonl').readline())
    assert row['loss/feat_custom'] is None and row['acc/teacher_custom'] is None and row['loss/customize'] is None
    assert summary['acc_teacher_custom_last'] is None


def test_custom_every_skips_stage1(tmp_path):
    code, _, _ = run_main(TINY + ['--epochs', '3', '--custom-every', '2', '--out-dir', str(tmp_path / 'c')])
    assert code == 0 and [r['loss/customize'] is None for r in rows(tmp_path / 'c')] == [False, True, False]


def test_teacher_cache_run(tmp_path):
    code, summary, _ = run_main(TINY + ['--teacher-cache', '--out-dir', str(tmp_path / 'c')])
    assert code == 0 and summary['acc_teacher_custom_last'] is not None and summary['time/teacher_cache_s'] > 0


# ------------------------------------------------------------------ CIFAR on-disk format
def write_cifar100(root, n_train=300, n_test=100):
    base = root / 'cifar-100-python'
    base.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (('train', n_train), ('test', n_test)):
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        with open(base / name, 'wb') as f:
            pickle.dump({'data': data, 'fine_labels': [i % 100 for i in range(n)], 'coarse_labels': [0] * n}, f)
    with open(base / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)], 'coarse_label_names': ['x']}, f)
    return data


@pytest.fixture
def no_md5(monkeypatch):
    """Our files cannot match the real archive's md5 sums; everything else is torchvision's own reader."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, '_check_integrity', lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a, **k: True)


def test_cifar100_loads_from_torchvision_files(tmp_path, no_md5):
    test_data = write_cifar100(tmp_path)
    x, y, classes = ck.load_cifar('cifar100', str(tmp_path), train=False)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8 and len(classes) == 100
    assert torch.equal(x[7], torch.from_numpy(test_data[7]).view(3, 32, 32)) and y[7] == 7
    code, summary, _ = run_main(['--dataset', 'cifar100', '--data-dir', str(tmp_path), '--labels', '100', '--epochs', '1',
                                 '--no-pretrained', '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs',
                                 '{"depth": 1, "patch_size": 8}', '--student', 'mobilenetv3_small_050', '--teacher-res', '32',
                                 '--student-res', '32', '--batch-size', '50', '--mu', '2', '--out-dir', str(tmp_path / 'r')])
    assert code == 0 and summary['num_labeled'] == 100 and summary['num_unlabeled'] == 300


def test_cifar_missing_offline_fails_fast(tmp_path, capsys):
    t = time.time()
    code, _, err = run_main(['--dataset', 'cifar100', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 2 and time.time() - t < 10
    assert 'cifar-100-python.tar.gz' in err and '--data-dir' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'r').exists()


def test_cifar_download_failure_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    def no_net(self):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', no_net)
    code, _, err = run_main(['--dataset', 'cifar10', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 2 and 'URLError' in err and 'cifar-10-python.tar.gz' in err and 'cifar-10-batches-py' in err


# ------------------------------------------------------------------ models and weights
def test_pretrained_offline_names_every_way_out(tmp_path, capsys):
    t = time.time()
    code, _, err = run_main(TINY + ['--pretrained', '--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 2 and time.time() - t < 30 and len(err.strip().splitlines()) == 1
    for hint in ('--no-pretrained', '--teacher-weights', '--student-weights', 'HF_HUB_OFFLINE=1'):
        assert hint in err


def test_local_weight_files_load_through_timm(tmp_path):
    import timm
    src = timm.create_model('vit_tiny_patch16_224', depth=1, patch_size=8, img_size=64, num_classes=0)
    torch.save(src.state_dict(), tmp_path / 't.pth')
    t = ck.create_model('vit_tiny_patch16_224', 0, 32, False, str(tmp_path / 't.pth'), {'depth': 1, 'patch_size': 8}, 'teacher')
    assert t.pos_embed.shape == (1, 1 + 16, 192) != src.pos_embed.shape  # resampled from 8x8 to 4x4 patches
    assert torch.equal(t.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    s_src = timm.create_model('mobilenetv3_small_050', num_classes=1000)
    torch.save(s_src.state_dict(), tmp_path / 's.pth')
    s = ck.create_model('mobilenetv3_small_050', 10, 32, False, str(tmp_path / 's.pth'), {}, 'student')
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


def test_bring_your_own_models(tmp_path):
    teacher, student = TinyNet(24), TinyNet(16, num_classes=10)
    code, summary, _ = run_main(TINY + ['--out-dir', str(tmp_path / 'own')], teacher=teacher, student=student)
    assert code == 0 and summary['args']['student'] == 'TinyNet' and summary['acc_teacher_custom_last'] is not None
    saved = torch.load(tmp_path / 'own' / 'student.pt', weights_only=True)
    assert saved['model'] == 'TinyNet' and torch.equal(saved['state_dict']['fc.weight'], student.fc.weight.cpu())


# ------------------------------------------------------------------ folders of images
def write_folder(root, classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            colour = torch.tensor([255 * (c % 2), 120, 255 * (1 - c % 2)]) + torch.randint(-20, 21, (3,), generator=g)
            img = colour.clamp(0, 255).to(torch.uint8).view(1, 1, 3).expand(40, 48, 3).numpy()
            Image.fromarray(img.copy()).save(root / name / f'{i}.png')


def test_folder_dataset_for_domain_adaptation(tmp_path):
    for d, n, s in (('src', 6, 0), ('tgt', 5, 1), ('tgt_test', 4, 2)):
        write_folder(tmp_path / d, ['cat', 'dog'], n, s)
    x, y, classes = ck.load_folder(str(tmp_path / 'src'), 32)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and classes == ['cat', 'dog'] and y.tolist() == [0] * 6 + [1] * 6
    code, summary, _ = run_main(['--dataset', 'folder', '--train-dir', str(tmp_path / 'src'), '--unlabeled-dir',
                                 str(tmp_path / 'tgt'), '--test-dir', str(tmp_path / 'tgt_test'), '--labels', 'all',
                                 '--image-size', '32', '--teacher-res', '32', '--student-res', '32', '--no-pretrained',
                                 '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs', '{"depth": 1, "patch_size": 8}',
                                 '--student', 'mobilenetv3_small_050', '--epochs', '2', '--batch-size', '4', '--mu', '1',
                                 '--out-dir', str(tmp_path / 'r')])
    assert code == 0 and summary['num_labeled'] == 12 and summary['num_unlabeled'] == 10 and summary['num_train_images'] == 22


def test_folder_class_mismatch_is_a_clear_error(tmp_path, capsys):
    write_folder(tmp_path / 'a', ['cat', 'dog'], 2, 0)
    write_folder(tmp_path / 'b', ['cat', 'bird'], 2, 0)
    code, _, err = run_main(['--dataset', 'folder', '--train-dir', str(tmp_path / 'a'), '--test-dir', str(tmp_path / 'b'),
                             '--image-size', '32', '--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 2 and "'bird'" in err and "'dog'" in err and '--test-dir' in err


# ------------------------------------------------------------------ bad input
BAD = [(['--labels', 'ten'], "'ten'"), (['--labels', '0'], 'positive count'), (['--labels', '0pct'], 'percentage'),
       (['--labels', '150pct'], 'percentage'), (['--labels', '-5'], "'-5'"), (['--labels', '15'], 'divide evenly'),
       (['--labels', '400'], 'class 0 has 20 images'), (['--dataset', 'imagenet'], 'invalid choice'),
       (['--student', 'no_such_net'], 'unknown timm model'), (['--teacher', 'no_such_vit'], 'unknown timm model'),
       (['--device', 'cuda'], 'no CUDA device'), (['--epochs', '0'], '--epochs must be positive'),
       (['--batch-size', '-4'], '--batch-size must be positive'), (['--lr', '0'], '--lr must be positive'),
       (['--lr-custom', '-1'], '--lr-custom must be positive'), (['--teacher-kwargs', '[1]'], 'JSON object'),
       (['--dataset', 'folder'], '--train-dir')]


@pytest.mark.parametrize('argv,message', BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if argv == ['--device', 'cuda'] and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    code, _, err = run_main(TINY + argv + ['--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith('customkd: error:')
    assert not (tmp_path / 'r').exists()


def test_cli_errors_print_no_traceback():
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    for argv in (['--labels', 'ten'], ['--dataset', 'synthetic', '--labels', '7']):
        p = subprocess.run([sys.executable, os.path.join(HERE, 'customkd.py'), *argv], capture_output=True, text=True,
                           env=env, cwd=HERE, timeout=120)
        assert p.returncode == 2 and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_help_lists_every_flag_with_help_text():
    parser = ck.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != 'help']
    assert len(flags) >= 30 and all(a.help for a in flags)


# ------------------------------------------------------------------ run directories and checkpoints
def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / 'r'
    assert run_main(TINY + ['--epochs', '1', '--out-dir', str(out)])[0] == 0
    capsys.readouterr()
    before = (out / 'metrics.jsonl').read_bytes()
    code, _, err = run_main(TINY + ['--epochs', '1', '--out-dir', str(out)], capsys)
    assert code == 2 and '--overwrite' in err and '--resume' in err and (out / 'metrics.jsonl').read_bytes() == before
    with pytest.MonkeyPatch.context() as mp:  # an --overwrite run stopped in its first epoch: nothing old survives
        mp.setattr(ck, 'customize_epoch', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        assert run_main(TINY + ['--epochs', '1', '--overwrite', '--out-dir', str(out)])[0] == 130
    assert sorted(os.listdir(out)) == ['args.json', 'metrics.jsonl'] and (out / 'metrics.jsonl').read_text() == ''
    assert run_main(TINY + ['--epochs', '1', '--overwrite', '--out-dir', str(out)])[0] == 0
    assert sorted(os.listdir(out)) == ['args.json', 'checkpoint.pt', 'metrics.jsonl', 'student.pt', 'summary.json']


def test_resume_refuses_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / 'r'
    code, _, err = run_main(TINY + ['--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and 'no checkpoint' in err
    assert run_main(TINY + ['--epochs', '1', '--out-dir', str(out)])[0] == 0
    capsys.readouterr()
    code, _, err = run_main(TINY + ['--labels', '20', '--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and '--labels 10pct' in err
    code, _, err = run_main(TINY + ['--split-seed', '3', '--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and '--split-seed 0' in err
    code, _, err = run_main(TINY + ['--student', 'mobilenetv3_small_075', '--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and '--student mobilenetv3_small_050' in err
    code, _, err = run_main(TINY + ['--teacher', 'vit_small_patch16_224', '--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and '--teacher vit_tiny_patch16_224' in err
    code, _, err = run_main(['--dataset', 'cifar10', '--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and '--dataset synthetic' in err
    good = (out / 'checkpoint.pt').read_bytes()
    (out / 'checkpoint.pt').write_bytes(good[:len(good) // 2])
    code, _, err = run_main(TINY + ['--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and 'not a readable CustomKD checkpoint' in err
    torch.save({'identity': {}, 'payload': TinyNet(2)}, out / 'checkpoint.pt')  # pickled code: must not be loaded
    code, _, err = run_main(TINY + ['--resume', '--out-dir', str(out)], capsys)
    assert code == 2 and 'not a readable CustomKD checkpoint' in err


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'c.pt')
    ck.save_atomic({'epoch': 1}, path)
    def crash(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({'epoch': 2}, path)
    assert torch.load(path, weights_only=True) == {'epoch': 1} and os.listdir(tmp_path) == ['c.pt']


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    real, epochs_done = ck.loss_entropy, []
    monkeypatch.setattr(ck, 'loss_entropy', lambda z: real(z) * (math.nan if epochs_done else 1.0))
    real_line = ck.console_line
    monkeypatch.setattr(ck, 'console_line', lambda row, n: epochs_done.append(row['epoch']) or real_line(row, n))
    code, _, err = run_main(TINY + ['--epochs', '3', '--out-dir', str(tmp_path / 'r')], capsys)
    assert code == 3 and 'loss/entropy became non-finite in epoch 2' in err and 'checkpoint of epoch 1' in err
    assert torch.load(tmp_path / 'r' / 'checkpoint.pt', weights_only=True)['epoch'] == 1


DET = TINY + ['--epochs', '3', '--deterministic']


def test_stop_and_resume_is_exact(tmp_path, monkeypatch):
    ref, part = tmp_path / 'ref', tmp_path / 'part'
    assert run_main(DET + ['--out-dir', str(ref)])[0] == 0
    real_line = ck.console_line
    def stop_after_first(row, n):
        if row['epoch'] == 1:
            raise KeyboardInterrupt
        return real_line(row, n)
    monkeypatch.setattr(ck, 'console_line', stop_after_first)
    assert run_main(DET + ['--out-dir', str(part)])[0] == 130
    monkeypatch.setattr(ck, 'console_line', real_line)
    assert len(rows(part)) == 1
    assert run_main(DET + ['--out-dir', str(part), '--resume'])[0] == 0
    assert rows(part) == rows(ref) and len(rows(ref)) == 3
    assert (part / 'student.pt').read_bytes() == (ref / 'student.pt').read_bytes()


def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path):
    ref, part = tmp_path / 'ref', tmp_path / 'part'
    argv = DET + ['--synthetic-size', '400', '--epochs', '4']
    assert run_main(argv + ['--out-dir', str(ref)])[0] == 0
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'customkd.py'), *argv, '--out-dir', str(part)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE='1'))
    metrics, deadline = part / 'metrics.jsonl', time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 1):
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'interrupted' in err and 'Traceback' not in err
    done = torch.load(part / 'checkpoint.pt', weights_only=True)['epoch']
    assert 1 <= done < 4 and len(rows(part)) == done
    assert run_main(argv + ['--out-dir', str(part), '--resume'])[0] == 0
    assert rows(part) == rows(ref)
    assert (part / 'student.pt').read_bytes() == (ref / 'student.pt').read_bytes()
