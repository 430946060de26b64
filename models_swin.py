"""HyperIQA with a Swin Transformer backbone: the whole model in one file.

The network follows Su et al., "Blindly Assess Image Quality in the Wild Guided by
a Self-Adaptive Hyper Network" (CVPR 2020), with the backbone swapped for a timm
Swin Transformer and two optional changes from the user's research code:

* multi-scale fusion: every backbone stage is pooled to 7x7 and concatenated on
  channels before the hyper-network (default on);
* attention fusion: a small net on the global stage-4 feature weights the four
  pooled stages before concatenation.

Module names (``swin.backbone``, ``swin.lda1_pool``, ``multiscale_attention.attention_net``,
``conv1``, ``fc1w_conv`` ... ``fc5b_fc``; ``res`` for the ResNet-50 layout of the
original HyperIQA release) are kept exactly as in the user's code so that their
``best_model_srcc_*.pkl`` files load with ``strict=True``.

Run ``python models_swin.py`` to print the size of every variant.
"""
import argparse
import contextlib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from iqa.ckpt import strip_wrapper_prefixes
from iqa.runtime import PROXY_VARIABLES as _PROXY_VARIABLES  # noqa: F401 (tests)
from iqa.runtime import hub_unreachable as _hub_host_unresolvable

MODEL_SIZES = ('nano', 'tiny', 'small', 'base', 'resnet50')

SWIN_VARIANTS = {
    'tiny': 'swin_tiny_patch4_window7_224',
    'small': 'swin_small_patch4_window7_224',
    'base': 'swin_base_patch4_window7_224',
    # nano: the same timm class, narrow and shallow, always randomly initialised.
    # It exists so tests and the CPU demo can exercise the real architecture.
    'nano': 'swin_tiny_patch4_window7_224',
}
NANO_KWARGS = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))

STAGE_CHANNELS = {
    'nano': (32, 64, 128, 256),
    'tiny': (96, 192, 384, 768),
    'small': (96, 192, 384, 768),
    'base': (128, 256, 512, 1024),
    'resnet50': (256, 512, 1024, 2048),
}

# HyperIQA's fixed sizes: 224-d target-net input made of 3 x 16 LDA features + 176,
# target net 224 -> 112 -> 56 -> 28 -> 14 -> 1, hyper features 112 x 7 x 7.
LDA_OUT = 16
TARGET_IN = 224
TARGET_FC = (112, 56, 28, 14)
HYPER_CHANNELS = 112
FEATURE_SIZE = 7

# Buffers timm recomputes at construction; some timm versions saved them in the
# state_dict, newer ones do not. Dropping them makes both kinds of file load.
_NON_PERSISTENT_BUFFERS = ('relative_position_index', 'attn_mask')


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for but could not be obtained."""


def _offline_message(what, err):
    return (f'Could not load the ImageNet weights for {what}: {type(err).__name__}: {err}\n'
            'This machine seems to have no access to the model hub (offline cluster?). Either\n'
            '  * pass a local weights file:  --pretrained_path /path/to/weights.safetensors|.pth\n'
            '    (build_model(..., pretrained_path=...)), e.g. copied from a machine with internet, or\n'
            '  * train from random initialisation: --no_pretrained (build_model(..., pretrained=False)).')


@contextlib.contextmanager
def _hub_offline_if_unreachable():
    import huggingface_hub.constants as hub
    if hub.HF_HUB_OFFLINE or not _hub_host_unresolvable():
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _add_lda_heads(module, channels):
    """Attach HyperIQA's local distortion-aware (LDA) heads to `module`.

    They are attributes of the backbone container (not a sub-module) because the
    original checkpoints name them ``swin.lda1_pool.0.weight``/``res.lda1_pool...``.
    Stage i is reduced to a small grid by a 1x1 conv and a 7x7 average pool, then a
    linear layer; stage 4 is pooled to 1x1. The four outputs form the 224-d
    target-network input, so the quality rule sees local detail from every stage.
    """
    c1, c2, c3, c4 = channels
    module.lda1_pool = nn.Sequential(nn.Conv2d(c1, 16, 1, bias=False), nn.AvgPool2d(7, stride=7))
    module.lda1_fc = nn.Linear(16 * 64, LDA_OUT)  # 56x56 -> 8x8
    module.lda2_pool = nn.Sequential(nn.Conv2d(c2, 32, 1, bias=False), nn.AvgPool2d(7, stride=7))
    module.lda2_fc = nn.Linear(32 * 16, LDA_OUT)  # 28x28 -> 4x4
    module.lda3_pool = nn.Sequential(nn.Conv2d(c3, 64, 1, bias=False), nn.AvgPool2d(7, stride=7))
    module.lda3_fc = nn.Linear(64 * 4, LDA_OUT)  # 14x14 -> 2x2
    module.lda4_pool = nn.AvgPool2d(7, stride=7)  # 7x7 -> 1x1
    module.lda4_fc = nn.Linear(c4, TARGET_IN - 3 * LDA_OUT)
    for layer in (module.lda1_pool[0], module.lda2_pool[0], module.lda3_pool[0],
                  module.lda1_fc, module.lda2_fc, module.lda3_fc, module.lda4_fc):
        nn.init.kaiming_normal_(layer.weight)


def _lda_vector(module, feats):
    """(B, 224) target-network input from the four stage features (B, C, H, W)."""
    f1, f2, f3, f4 = feats
    return torch.cat([
        module.lda1_fc(module.lda1_pool(f1).flatten(1)),
        module.lda2_fc(module.lda2_pool(f2).flatten(1)),
        module.lda3_fc(module.lda3_pool(f3).flatten(1)),
        module.lda4_fc(module.lda4_pool(f4).flatten(1)),
    ], dim=1)


class SwinBackbone(nn.Module):
    """timm Swin (features_only, 4 stages) plus the LDA heads; module ``swin``."""

    def __init__(self, model_size, pretrained, pretrained_path, drop_path_rate):
        super().__init__()
        kwargs = dict(features_only=True, out_indices=(0, 1, 2, 3), drop_path_rate=drop_path_rate)
        if model_size == 'nano':
            kwargs.update(NANO_KWARGS)
            pretrained = False
        name = SWIN_VARIANTS[model_size]
        if pretrained and pretrained_path:
            # timm maps a classification checkpoint onto the features model itself.
            kwargs['pretrained_cfg_overlay'] = dict(file=str(pretrained_path))
        try:
            hub = _hub_offline_if_unreachable() if pretrained and not pretrained_path else contextlib.nullcontext()
            with hub:
                self.backbone = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
        except Exception as err:  # hub/network/file errors all mean the same thing to a user
            if not pretrained:
                raise
            if pretrained_path:
                raise PretrainedWeightsError(
                    f'Could not load the weights file {pretrained_path} into {name}: '
                    f'{type(err).__name__}: {err}\nIt must be an ImageNet classification '
                    f'checkpoint of {name} (timm .safetensors/.pth), or pass --no_pretrained.') from err
            raise PretrainedWeightsError(_offline_message(name, err)) from err
        # timm hands Swin stages out channels-last; note it once instead of guessing per call.
        self.channels_last = str(getattr(self.backbone, 'output_fmt', 'NCHW')).endswith('NHWC')
        _add_lda_heads(self, STAGE_CHANNELS[model_size])

    def stage_features(self, x):
        feats = self.backbone(x)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats


class ResNetBackbone(nn.Module):
    """torchvision-layout ResNet-50 plus the LDA heads; module ``res``.

    The layout (``res.conv1``, ``res.bn1``, ``res.layer1``...) is the one of the
    original HyperIQA release, so ``koniq_pretrained.pkl`` loads unchanged.
    """

    def __init__(self, pretrained, pretrained_path):
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        if pretrained:
            try:
                if pretrained_path:
                    state = torch.load(pretrained_path, map_location='cpu', weights_only=True)
                    state = state.get('state_dict', state)
                else:
                    state = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
                net.load_state_dict(state, strict=False)
            except Exception as err:
                if pretrained_path:
                    raise PretrainedWeightsError(
                        f'Could not load the weights file {pretrained_path} into resnet50: '
                        f'{type(err).__name__}: {err}') from err
                raise PretrainedWeightsError(_offline_message('resnet50', err)) from err
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels_last = False
        self.input_channels_last = False   # set by use_channels_last (CUDA)
        _add_lda_heads(self, STAGE_CHANNELS['resnet50'])

    def stage_features(self, x):
        if self.input_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


class MultiScaleAttention(nn.Module):
    """Per-image softmax weights for the four pooled stages, from global stage 4.

    Initialised near zero so training starts from (almost) uniform weights, i.e.
    from plain multi-scale concatenation.
    """

    def __init__(self, stage4_channels):
        super().__init__()
        self.attention_net = nn.Sequential(
            nn.Linear(stage4_channels, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, 4), nn.Softmax(dim=1))
        for layer in (self.attention_net[0], self.attention_net[3]):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, stage4):
        return self.attention_net(stage4.mean(dim=(2, 3)))


class HyperIQA(nn.Module):
    """Backbone -> (fused) hyper features -> per-image target-net weights -> score.

    ``forward(x)`` maps a normalised (B, 3, 224, 224) batch to (B,) scores.
    """

    def __init__(self, model_size='base', use_multiscale=True, use_attention=False,
                 pretrained=True, pretrained_path=None, drop_path_rate=0.2, dropout_rate=0.3):
        super().__init__()
        if model_size not in MODEL_SIZES:
            raise ValueError(f'model_size must be one of {", ".join(MODEL_SIZES)}, got {model_size!r}')
        if use_attention and not use_multiscale:
            raise ValueError('use_attention=True needs use_multiscale=True: attention fusion weights '
                             'the multi-scale stage features, which single-scale mode does not build.')
        self.model_size = model_size
        self.use_multiscale = use_multiscale
        self.use_attention = use_attention
        self.dropout_rate = dropout_rate
        channels = STAGE_CHANNELS[model_size]
        if model_size == 'resnet50':
            self.res = ResNetBackbone(pretrained, pretrained_path)
            # The original HyperIQA has no dropout at all, neither on the hyper features nor in the
            # target net: the paper's baseline row (resnet50 --no_multiscale) must train like it.
            self.target_dropout = 0.0
            hyper_dropout = 0.0
            hidden = (1024, 512)
        else:
            self.swin = SwinBackbone(model_size, pretrained, pretrained_path, drop_path_rate)
            self.target_dropout = dropout_rate
            hyper_dropout = dropout_rate
            hidden = (512, 256)
        if use_attention:
            self.multiscale_attention = MultiScaleAttention(channels[3])
        in_channels = sum(channels) if use_multiscale else channels[3]
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, hidden[0], 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden[0], hidden[1], 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden[1], HYPER_CHANNELS, 1), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(hyper_dropout)

        # Weight generators: a 3x3 conv whose (C, 7, 7) output, read row-major,
        # is one image's (out, in) weight matrix; biases come from the pooled feature.
        f1, f2, f3, f4 = TARGET_FC
        area = FEATURE_SIZE ** 2
        self.fc1w_conv = nn.Conv2d(HYPER_CHANNELS, TARGET_IN * f1 // area, 3, padding=1)
        self.fc1b_fc = nn.Linear(HYPER_CHANNELS, f1)
        self.fc2w_conv = nn.Conv2d(HYPER_CHANNELS, f1 * f2 // area, 3, padding=1)
        self.fc2b_fc = nn.Linear(HYPER_CHANNELS, f2)
        self.fc3w_conv = nn.Conv2d(HYPER_CHANNELS, f2 * f3 // area, 3, padding=1)
        self.fc3b_fc = nn.Linear(HYPER_CHANNELS, f3)
        self.fc4w_conv = nn.Conv2d(HYPER_CHANNELS, f3 * f4 // area, 3, padding=1)
        self.fc4b_fc = nn.Linear(HYPER_CHANNELS, f4)
        self.fc5w_fc = nn.Linear(HYPER_CHANNELS, f4)
        self.fc5b_fc = nn.Linear(HYPER_CHANNELS, 1)
        for name in ('fc1w_conv', 'fc1b_fc', 'fc2w_conv', 'fc2b_fc', 'fc3w_conv', 'fc3b_fc',
                     'fc4w_conv', 'fc4b_fc', 'fc5w_fc', 'fc5b_fc'):
            nn.init.kaiming_normal_(getattr(self, name).weight)  # as the original HyperIQA
        self.last_attention_weights = None

    @property
    def backbone_net(self):
        return self.res if self.model_size == 'resnet50' else self.swin

    def backbone_parameters(self):
        """Parameters trained at the backbone learning rate.

        As in the original HyperIQA solver this is the whole ``res``/``swin``
        container, LDA heads included; everything else gets ``lr * lr_ratio``.
        """
        return list(self.backbone_net.parameters())

    def head_parameters(self):
        backbone_ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    def hyper_features(self, feats):
        """(B, C, 7, 7) hyper-network input: stage 4, or the (weighted) stage mix."""
        if not self.use_multiscale:
            return F.adaptive_avg_pool2d(feats[3], FEATURE_SIZE)
        pooled = [F.adaptive_avg_pool2d(f, FEATURE_SIZE) for f in feats]
        if self.use_attention:
            weights = self.multiscale_attention(feats[3])
            self.last_attention_weights = weights.detach()
            pooled = [p * weights[:, i].view(-1, 1, 1, 1) for i, p in enumerate(pooled)]
        return torch.cat(pooled, dim=1)

    def target_params(self, hyper):
        """Per-image target-net weights [(B, out, in)] and biases [(B, out)]."""
        b = hyper.shape[0]
        g = hyper.mean(dim=(2, 3))  # global-pooled 112-d feature
        f1, f2, f3, f4 = TARGET_FC
        weights = [
            self.fc1w_conv(hyper).reshape(b, f1, TARGET_IN),
            self.fc2w_conv(hyper).reshape(b, f2, f1),
            self.fc3w_conv(hyper).reshape(b, f3, f2),
            self.fc4w_conv(hyper).reshape(b, f4, f3),
            self.fc5w_fc(g).reshape(b, 1, f4),
        ]
        biases = [self.fc1b_fc(g), self.fc2b_fc(g), self.fc3b_fc(g), self.fc4b_fc(g), self.fc5b_fc(g)]
        return weights, biases

    def target_net(self, target_in, weights, biases):
        """Run every image's own small MLP at once (batched matmul, no module per step).

        Sigmoid after the four hidden layers, dropout after the first three while
        training; the last layer is linear. Returns (B,) even for B == 1.
        """
        q = target_in
        for i, (w, bias) in enumerate(zip(weights, biases)):
            q = torch.einsum('boi,bi->bo', w, q) + bias
            if i < 4:
                q = torch.sigmoid(q)
            if i < 3 and self.target_dropout > 0:
                q = F.dropout(q, self.target_dropout, self.training)
        return q[:, 0]

    def forward(self, x):
        net = self.backbone_net
        feats = net.stage_features(x)
        target_in = _lda_vector(net, feats)
        hyper = self.dropout(self.conv1(self.hyper_features(feats)))
        # The generated weights and the target net run in fp32 even under bf16 autocast: in bf16
        # a score near 60 (KonIQ's 0-100 scale) moves in steps of 0.25, coarser than the ranking
        # margin, and early near-constant predictions became exact ties. They are a small part
        # of the compute; the backbone and the hyper-feature convs keep bf16.
        with torch.autocast(x.device.type, enabled=False):
            weights, biases = self.target_params(hyper.float())
            return self.target_net(target_in.float(), weights, biases)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Also accepts files from the user's original code and from DDP/compiled runs."""
        return super().load_state_dict(normalise_state_dict(state_dict, self.state_dict().keys()),
                                       strict=strict, assign=assign)


def normalise_state_dict(state_dict, expected_keys=None):
    """Strip DDP/compile prefixes (strip_wrapper_prefixes) and drop buffers that
    timm rebuilds itself when the model does not expect them."""
    out = strip_wrapper_prefixes(state_dict)
    if expected_keys is not None:
        expected = set(expected_keys)
        out = {k: v for k, v in out.items()
               if k in expected or not k.rsplit('.', 1)[-1] in _NON_PERSISTENT_BUFFERS}
    return out


def infer_model_config(state_dict):
    """Architecture of a bare state_dict (the user's old ``best_model_*.pkl``).

    Size comes from the channel widths (and, to split tiny from small, the depth
    of stage 3), attention from the presence of ``multiscale_attention.*``,
    multi-scale from the input width of ``conv1``.
    """
    sd = normalise_state_dict(state_dict)
    if 'res.conv1.weight' in sd:
        model_size = 'resnet50'
    elif 'swin.lda1_pool.0.weight' in sd:
        c1 = sd['swin.lda1_pool.0.weight'].shape[1]
        by_width = {32: 'nano', 96: 'tiny', 128: 'base'}
        if c1 not in by_width:
            raise ValueError(f'unrecognised backbone width {c1} in state_dict (expected 32, 96 or 128)')
        model_size = by_width[c1]
        if model_size == 'tiny' and any(k.startswith('swin.backbone.layers_2.blocks.6.') for k in sd):
            model_size = 'small'  # small = tiny widths with 18 blocks in stage 3
    else:
        raise ValueError('not a HyperIQA state_dict: it has neither swin.lda1_pool.0.weight nor '
                         'res.conv1.weight')
    channels = STAGE_CHANNELS[model_size]
    conv_in = sd['conv1.0.weight'].shape[1]
    if conv_in not in (sum(channels), channels[3]):
        raise ValueError(f'conv1 input width {conv_in} fits neither multi-scale ({sum(channels)}) '
                         f'nor single-scale ({channels[3]}) {model_size}')
    return dict(model_size=model_size, use_multiscale=conv_in == sum(channels),
                use_attention=any(k.startswith('multiscale_attention.') for k in sd))


def build_model(model_size, use_multiscale=True, use_attention=False, pretrained=True,
                pretrained_path=None, drop_path_rate=0.2, dropout_rate=0.3):
    """One nn.Module mapping a normalised (B, 3, 224, 224) batch to (B,) scores.

    pretrained=True fetches timm's (torchvision's for resnet50) ImageNet weights;
    pretrained_path loads them from a local file instead; pretrained=False starts
    from random weights. ``nano`` is always random (no published weights exist).
    """
    return HyperIQA(model_size, use_multiscale=use_multiscale, use_attention=use_attention,
                    pretrained=pretrained, pretrained_path=pretrained_path,
                    drop_path_rate=drop_path_rate, dropout_rate=dropout_rate)


def use_channels_last(model, device):
    """Run a ResNet-50 backbone in channels-last memory format on CUDA (cuDNN's tensor-core
    convolutions take NHWC without a transpose per layer); True when it was switched. The scores
    are the same function of the input; Swin backbones and the CPU are left as they are."""
    net = model.backbone_net
    if torch.device(device).type != 'cuda' or not isinstance(net, ResNetBackbone):
        return False
    net.to(memory_format=torch.channels_last)
    net.input_channels_last = True
    return True


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description='Print the parameter count of every model variant '
                                                 '(random weights, nothing is downloaded).')
    parser.add_argument('--sizes', nargs='+', default=list(MODEL_SIZES), choices=MODEL_SIZES,
                        metavar='SIZE', help='variants to build (default: all)')
    args = parser.parse_args()
    print('| model | multi-scale | attention | params (M) |')
    print('|---|---|---|---|')
    for size in args.sizes:
        for multiscale, attention in ((True, True), (True, False), (False, False)):
            model = build_model(size, multiscale, attention, pretrained=False)
            print(f'| {size} | {multiscale} | {attention} | {count_parameters(model) / 1e6:.2f} |')


if __name__ == '__main__':
    main()
