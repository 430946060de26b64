"""The CLIP model of the second system: quality and text-image consistency of AI-generated images.

    img, txt = L2-normalised CLIP image / text embeddings;  cos = img . txt

Residual mode (default, the user's baseline.py):
    q      = bound( sigmoid(Linear(img)) + s_q * tanh(MLP_q(img)) )
    c_base = bound( alpha * (cos + 1) / 2 + beta )                 alpha = 1, beta = 0 at start
    c      = bound( c_base + s_c * tanh(MLP_c([img, txt, cos])) )
Direct mode (--no_residual_learning):
    q = sigmoid(Linear(img));  c = sigmoid(MLP([img, txt, cos]))
    --use_two_branch: c = (c + sigmoid(k * cos + b)) / 2, k = 5 and b = 0 at start
    --use_refinement: c = clamp(c + r * tanh(Refine([img, txt, c])), 0, 1), r = 0.1 at start

`bound` is clamp(., 0, 1) as in the original. A clamp passes no gradient once a score sits
at 0 or 1; 'smooth' (a flag of train_clip.py) replaces it by a bound that is the identity
inside [0.05, 0.95] and bends smoothly into (0, 1) outside. README, "CLIP system", has
what the demo measured for each.

Backbones come from open-clip-torch (both towers; its tokenizer vocabulary ships with the
package, so everything here works offline). Named configs: CLIP_MODELS. 'nano' is a tiny
random-initialised CLIP for tests and the demo. A checkpoint carries model_config(), which
rebuilds the model without any download (build_from_config).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from iqa.runtime import hub_unreachable as _hub_unreachable

# our name -> open_clip's name; 'nano' is built here from NANO_CONFIG
CLIP_MODELS = {'nano': None, 'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16', 'ViT-L/14': 'ViT-L-14'}
# other spellings a user types: open_clip's and the Hugging Face names of the original program
CLIP_ALIASES = {
    'ViT-B-32': 'ViT-B/32', 'ViT-B-16': 'ViT-B/16', 'ViT-L-14': 'ViT-L/14',
    'openai/clip-vit-base-patch32': 'ViT-B/32', 'openai/clip-vit-base-patch16': 'ViT-B/16',
    'openai/clip-vit-large-patch14': 'ViT-L/14',
}
DEFAULT_CLIP_MODEL = 'ViT-L/14'   # the original's default (openai/clip-vit-large-patch14)
NANO_CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=64, layers=4, width=64, head_width=32, patch_size=8, mlp_ratio=2.0),
    text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=3, mlp_ratio=2.0),
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOUNDS = ('clamp', 'smooth')


class PretrainedWeightsError(RuntimeError):
    """Pretrained CLIP weights were asked for but could not be obtained."""


def canonical_name(name):
    """'ViT-L/14' from any accepted spelling; ValueError listing the choices otherwise."""
    name = str(name).strip()
    if name in CLIP_MODELS:
        return name
    if name in CLIP_ALIASES:
        return CLIP_ALIASES[name]
    raise ValueError(f'unknown CLIP model {name!r}: expected one of {", ".join(CLIP_MODELS)} '
                     f'(also accepted: {", ".join(CLIP_ALIASES)})')


def _offline_message(name, err):
    return (f'Could not load the pretrained CLIP weights for {name} (open_clip, pretrained=\'openai\'): '
            f'{type(err).__name__}: {str(err)[:300]}\n'
            'This machine seems to have no access to the model hub (offline cluster?). Either\n'
            '  * pass a local weights file:  --pretrained_path /path/to/open_clip_pytorch_model.bin\n'
            '    (copied from a machine with internet, e.g. from the Hugging Face cache), or\n'
            '  * train from random initialisation: --no_pretrained.')


def build_backbone(name, pretrained=True, pretrained_path=None):
    """(open_clip CLIP model, tokenizer, image size) for one of CLIP_MODELS."""
    import open_clip
    name = canonical_name(name)
    if name == 'nano':
        if pretrained or pretrained_path:
            raise PretrainedWeightsError("the 'nano' CLIP has no pretrained weights (it is for tests and the "
                                         'demo): pass --no_pretrained')
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        clip = CLIP(embed_dim=NANO_CONFIG['embed_dim'], vision_cfg=CLIPVisionCfg(**NANO_CONFIG['vision_cfg']),
                    text_cfg=CLIPTextCfg(**NANO_CONFIG['text_cfg']))
        context = NANO_CONFIG['text_cfg']['context_length']
    else:
        oc_name = CLIP_MODELS[name]
        if pretrained_path:
            if not os.path.isfile(pretrained_path):
                raise PretrainedWeightsError(f'--pretrained_path {pretrained_path}: no such file')
            clip = open_clip.create_model(oc_name, pretrained=pretrained_path)
        elif pretrained:
            import huggingface_hub.constants as hub
            offline_before = hub.HF_HUB_OFFLINE
            if _hub_unreachable():
                hub.HF_HUB_OFFLINE = True
            try:
                clip = open_clip.create_model(oc_name, pretrained='openai')
            except Exception as err:  # open_clip wraps every hub failure in RuntimeError
                raise PretrainedWeightsError(_offline_message(name, err)) from err
            finally:
                hub.HF_HUB_OFFLINE = offline_before
        else:
            clip = open_clip.create_model(oc_name, pretrained=None)
        context = clip.context_length
    tokenizer = build_tokenizer(name, context)
    image_size = clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    return clip, tokenizer, image_size


def build_tokenizer(name, context_length=None):
    """open_clip's BPE tokenizer (its vocabulary ships with the package: works offline). All our
    models share OpenAI CLIP's vocabulary; only the context length differs (nano: 32, else 77)."""
    import open_clip
    if context_length is None:
        context_length = NANO_CONFIG['text_cfg']['context_length'] if canonical_name(name) == 'nano' else 77
    return open_clip.get_tokenizer('ViT-B-32', context_length=context_length)


def smooth_bound(x, lo=0.05, hi=0.95):
    """Identity on [lo, hi]; outside it exponential tails that stay inside (0, 1) and meet the
    line with slope 1, so a score beyond a bound still gets a gradient (clamp gives none)."""
    below = lo * torch.exp(torch.clamp((x - lo) / lo, max=0.0))     # clamped: no inf in the unused branch
    above = 1 - (1 - hi) * torch.exp(torch.clamp((hi - x) / (1 - hi), max=0.0))
    return torch.where(x < lo, below, torch.where(x > hi, above, x))


class RefinementModule(nn.Module):
    """Second stage of --use_refinement: a small Transformer over one token made of
    [img, txt, coarse] predicts a bounded correction r * tanh(.) of the coarse consistency."""

    def __init__(self, dim, hidden_dim=256, num_layers=4, num_heads=8, dropout=0.1):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(2 * dim + 1, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU())
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, dim_feedforward=2 * hidden_dim,
                                           dropout=dropout, activation='gelu', batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.residual_head = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim // 2),
                                           nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim // 2, 1), nn.Tanh())
        self.residual_scale = nn.Parameter(torch.tensor(0.1))  # starts small, as in the original

    def forward(self, img, txt, coarse):
        x = self.input_proj(torch.cat([img, txt, coarse], dim=1)).unsqueeze(1)
        return self.residual_scale * self.residual_head(self.transformer(x).squeeze(1))


class ClipQualityModel(nn.Module):
    """CLIP towers + quality and consistency heads (+ the explanation head); see the module docstring.

    forward(pixels, text_ids) returns a dict with q, c (B,), c_coarse (the consistency before the
    refinement / residual), residual (refinement output or None), img, txt.
    """

    def __init__(self, clip_model='nano', pretrained=True, pretrained_path=None, residual=True,
                 residual_scale_q=0.2, residual_scale_c=0.2, dropout=0.1, use_two_branch=False,
                 use_refinement=False, refinement_layers=4, refinement_heads=8, refinement_dim=256,
                 bound='clamp'):
        super().__init__()
        if bound not in BOUNDS:
            raise ValueError(f'bound must be one of {BOUNDS}, got {bound!r}')
        self.config = dict(clip_model=canonical_name(clip_model), residual=bool(residual),
                           residual_scale_q=float(residual_scale_q), residual_scale_c=float(residual_scale_c),
                           dropout=float(dropout), use_two_branch=bool(use_two_branch),
                           use_refinement=bool(use_refinement), refinement_layers=int(refinement_layers),
                           refinement_heads=int(refinement_heads), refinement_dim=int(refinement_dim),
                           bound=bound)
        self.clip, self.tokenizer, self.image_size = build_backbone(clip_model, pretrained, pretrained_path)
        self.clip.logit_scale.requires_grad_(False)  # the contrastive temperature is unused here
        d = self.clip.text_projection.shape[1]
        self.embed_dim = d
        self.residual = residual
        if residual:
            self.q_base_head = nn.Linear(d, 1)
            self.q_delta_head = nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Dropout(dropout), nn.Linear(128, 1))
            self.c_base_scale = nn.Parameter(torch.tensor(1.0))   # alpha
            self.c_base_bias = nn.Parameter(torch.tensor(0.0))    # beta
            self.c_delta_head = nn.Sequential(nn.LayerNorm(2 * d + 1), nn.Linear(2 * d + 1, 256), nn.GELU(),
                                              nn.Dropout(dropout), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 1))
        else:
            self.q_head = nn.Linear(d, 1)
            self.c_head = nn.Sequential(nn.LayerNorm(2 * d + 1), nn.Linear(2 * d + 1, 256), nn.GELU(),
                                        nn.Linear(256, 1))
            if use_two_branch:
                self.c_scale = nn.Parameter(torch.tensor(5.0))
                self.c_bias = nn.Parameter(torch.tensor(0.0))
            if use_refinement:
                self.refinement = RefinementModule(d, refinement_dim, refinement_layers, refinement_heads)
        # [img, txt, cos] -> the explanation's text embedding (--use_explanations)
        self.rationale_head = nn.Sequential(nn.LayerNorm(2 * d + 1), nn.Linear(2 * d + 1, d))

    # ------------------------------------------------------------------ towers
    @property
    def text_layers(self):
        return len(self.clip.transformer.resblocks)

    @property
    def vision_layers(self):
        return len(self.clip.visual.transformer.resblocks)

    def tokenize(self, texts):
        return self.tokenizer(list(texts))

    def encode_image(self, pixels):
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def encode_text(self, ids):
        return F.normalize(self.clip.encode_text(ids).float(), dim=-1)

    # ------------------------------------------------------------------ heads
    def _bound(self, x):
        return torch.clamp(x, 0.0, 1.0) if self.config['bound'] == 'clamp' else smooth_bound(x)

    def heads(self, img, txt):
        cos = (img * txt).sum(-1, keepdim=True)
        fused = torch.cat([img, txt, cos], dim=1)
        residual = None
        if self.residual:
            q = self._bound(torch.sigmoid(self.q_base_head(img))
                            + self.config['residual_scale_q'] * torch.tanh(self.q_delta_head(img)))
            c_coarse = self._bound(self.c_base_scale * (cos + 1) / 2 + self.c_base_bias)
            c = self._bound(c_coarse + self.config['residual_scale_c'] * torch.tanh(self.c_delta_head(fused)))
        else:
            q = torch.sigmoid(self.q_head(img))
            c_coarse = torch.sigmoid(self.c_head(fused))
            if self.config['use_two_branch']:
                c_coarse = 0.5 * (c_coarse + torch.sigmoid(self.c_scale * cos + self.c_bias))
            c = c_coarse
            if self.config['use_refinement']:
                residual = self.refinement(img, txt, c_coarse)
                c = torch.clamp(c_coarse + residual, 0.0, 1.0)
        return {'q': q.squeeze(1), 'c': c.squeeze(1), 'c_coarse': c_coarse.squeeze(1),
                'residual': None if residual is None else residual.squeeze(1), 'img': img, 'txt': txt}

    def forward(self, pixels, text_ids):
        return self.heads(self.encode_image(pixels), self.encode_text(text_ids))

    def explanation_loss(self, img, txt, explanation_emb):
        """MSE between the normalised projection of [img, txt, cos] and the explanation's
        normalised text embedding (the original's rationale-alignment loss)."""
        cos = (img * txt).sum(-1, keepdim=True)
        pred = F.normalize(self.rationale_head(torch.cat([img, txt, cos], dim=1)), dim=-1)
        return F.mse_loss(pred, explanation_emb)

    # ------------------------------------------------------------------ parameter groups
    def backbone_parameters(self):
        return [p for p in self.clip.parameters() if p.requires_grad]

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith('clip.') and p.requires_grad]

    def freeze(self, freeze_clip=False, partial_freeze=False, freeze_layers=8, warn=print):
        """--freeze_clip: both towers frozen. --partial_freeze --freeze_layers N: the embeddings and
        the first N transformer blocks of each tower. A tower shallower than N+1 blocks is clamped
        to leave its last block trainable (with a warning): a whole tower is never frozen by
        accident. Returns a one-line description for the log."""
        if freeze_clip:
            self.clip.requires_grad_(False)
            return 'CLIP frozen (both towers); only the heads train'
        if not partial_freeze:
            return 'CLIP fully trainable'
        if freeze_layers < 0:
            raise ValueError(f'--freeze_layers must be >= 0, got {freeze_layers}')
        visual, used = self.clip.visual, {}
        towers = {'vision': (visual.transformer.resblocks,
                             [visual.conv1, visual.ln_pre, visual.class_embedding, visual.positional_embedding]),
                  'text': (self.clip.transformer.resblocks,
                           [self.clip.token_embedding, self.clip.positional_embedding])}
        for tower, (blocks, embeddings) in towers.items():
            n = freeze_layers
            if n >= len(blocks):
                n = len(blocks) - 1
                warn(f'--freeze_layers {freeze_layers}: the {tower} tower has only {len(blocks)} blocks; '
                     f'freezing its first {n} so that its last block still trains')
            for e in embeddings:
                e.requires_grad_(False)
            for block in blocks[:n]:
                block.requires_grad_(False)
            used[tower] = (n, len(blocks))
        return ('CLIP partially frozen: embeddings + first ' +
                ', '.join(f'{n}/{total} {tower} blocks' for tower, (n, total) in used.items()))

    def model_config(self):
        return dict(self.config)


def build_from_config(config, pretrained=False):
    """A ClipQualityModel from a checkpoint's model config (random weights, no download)."""
    keys = ('clip_model', 'residual', 'residual_scale_q', 'residual_scale_c', 'dropout', 'use_two_branch',
            'use_refinement', 'refinement_layers', 'refinement_heads', 'refinement_dim', 'bound')
    return ClipQualityModel(pretrained=pretrained, **{k: config[k] for k in keys if k in config})


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
