"""The CIFAR ResNets of the chenyaofo/pytorch-cifar-models release (BSD-3-Clause), written here as customkd teachers.

    from cifar_resnet import cifar_resnet
    teacher = cifar_resnet("cifar100_resnet56")                       # the release's weights, SHA-256 checked
    teacher = cifar_resnet("cifar100_resnet56", weights="cifar100_resnet56-f2eff4c8.pt")   # a local copy, offline

The layout is the release's, so its state dicts load strictly: conv1 (3 -> 16, 3x3), bn1, then layer1..layer3 of n
basic blocks each (16, 32, 64 channels; the first block of layers 2 and 3 has stride 2 and a 1x1-conv + BatchNorm
`downsample` shortcut), global average pooling to the 64-d feature, fc. n = 3, 5, 7, 9 for ResNet-20/32/44/56. The
module has the methods customkd calls (forward_features, forward_head(..., pre_logits=True), get_classifier), and the
release's normalisation in its `pretrained_cfg`, where customkd's timm config lookup finds it.
"""

import hashlib
import os
import re
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import customkd as ck  # noqa: E402

RELEASE = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet/"
HASHES = {  # the first 8 hex digits of each release file's SHA-256, as in its name
    "cifar10_resnet20": "4118986f",
    "cifar10_resnet32": "ef93fc4d",
    "cifar10_resnet44": "2a3cabcb",
    "cifar10_resnet56": "187c023a",
    "cifar100_resnet20": "23dac2f1",
    "cifar100_resnet32": "84213ce6",
    "cifar100_resnet44": "ffe32858",
    "cifar100_resnet56": "f2eff4c8",
}
NORMALISATION = {  # the release's input normalisation, by training set
    "cifar10": dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    "cifar100": dict(mean=(0.5070, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2761)),
}


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks, num_classes, normalisation):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        widths = [(16, 16, 1), (16, 32, 2), (32, 64, 2)]
        for i, (inplanes, planes, stride) in enumerate(widths, 1):
            layer = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.fc = nn.Linear(64, num_classes)
        self.pretrained_cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0, **normalisation)

    def forward_features(self, x):  # (B, 3, 32, 32) -> (B, 64, 8, 8)
        return self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))  # (B, 64): global average pooling, the feature f_t
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def cifar_resnet(name, weights=None, check_hash=True):
    """'cifar100_resnet56' etc. -> the model with the release's weights, loaded strictly: from `weights` (a local file,
    whose SHA-256 must be the release's unless check_hash=False), else from the release URL (hash checked). Every
    failure is a customkd.Abort with one line."""
    match = re.fullmatch(r"(cifar10|cifar100)_resnet(20|32|44|56)", name)
    if not match:
        raise ck.Abort(f"unknown CIFAR ResNet {name!r}: one of {', '.join(HASHES)}")
    dataset, depth = match.group(1), int(match.group(2))
    model = CifarResNet((depth - 2) // 6, 10 if dataset == "cifar10" else 100, NORMALISATION[dataset])
    file = f"{name}-{HASHES[name]}.pt"
    if weights is not None:
        if not os.path.isfile(weights):
            raise ck.Abort(f"{weights}: no such weight file (the release's is {RELEASE}{file})")
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if check_hash and not digest.startswith(HASHES[name]):
            raise ck.Abort(
                f"{weights}: SHA-256 {digest[:8]}..., not the release's {HASHES[name]}... ({file}): a damaged or "
                f"different file; check_hash=False loads your own weights in this layout"
            )
        try:  # weights_only: a weight file never runs pickled code
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ck.Abort(f"{weights}: not a readable state dict ({type(e).__name__})") from None
    else:
        try:
            state = torch.hub.load_state_dict_from_url(RELEASE + file, map_location="cpu", check_hash=True)
        except Exception as e:
            why = " ".join(str(e).split())[:200]
            raise ck.Abort(
                f"cannot fetch {RELEASE}{file} ({type(e).__name__}: {why}); offline? pass weights="
            ) from None
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # other keys or other shapes: torch names them all
        why = " ".join(str(e).split())
        raise ck.Abort(f"{weights or file} does not fit {name}: {why[:300]}") from None
    return model
