"""The CLIP model of the second system: quality and text-image consistency of AI-generated images.

    img, txt = L2-normalised CLIP image / text embeddings;  cos = img . txt

Residual mode (default, as in the original baseline.py):
    q      = bound( sigmoid(Linear(img)) + s_q * tanh(MLP_q(img)) )
    c_base = bound( alpha * (cos + 1) / 2 + beta )                 alpha = 1, beta = 0 at start
    c      = bound( c_base + s_c * tanh(MLP_c([img, txt, cos])) )
Direct mode (--no_residual_learning):
    q = sigmoid(Linear(img));  c = sigmoid(MLP([img, txt, cos]))
    --use_two_branch: c = (c + sigmoid(k * cos + b)) / 2, k = 5 and b = 0 at start
    --use_refinement: c = clamp(c + r * tanh(Refine([img, txt, c])), 0, 1), r = 0.1 at start

`bound` is clamp(., 0, 1) as in the original. A clamp passes no gradient once a score sits
at 0 or 1; 'smooth' (a flag of train_clip.py) replaces it by a bound that is the identity
inside [0.05, 0.95] and bends smoothly into (0, 1) outside. docs/clip.md, "The CLIP demo", has
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


def _load_into(clip, state_dict, source):
    missing, unexpected = clip.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsError(f'{source}: the weights do not fit the model (missing {sorted(missing)[:5]}, '
                                     f'unexpected {sorted(unexpected)[:5]})')
    return clip


def is_local_weights(path):
    """True when `path` names a local folder or file (a Hugging Face CLIPModel folder, its weights
    file, or an open_clip weights file), not a model name."""
    return bool(path) and os.path.exists(os.path.expanduser(str(path)))


def hf_weights(path):
    """(open_clip state_dict, clip_config) when `path` is a local Hugging Face CLIPModel folder or
    weights file, None when it is another file (an open_clip weights file)."""
    from iqa.clip import hf_import
    if os.path.isdir(path):
        return hf_import.load_hf_folder(path)
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                keys = set(f.keys())
        else:   # memory-mapped: only the keys are read here
            with torch.serialization.safe_globals(hf_import._numpy_safe_globals()):
                keys = set(torch.load(path, map_location='cpu', weights_only=True, mmap=True))
    except Exception:   # not a zip/safetensors state_dict: let open_clip read it (and say what is wrong)
        return None
    return hf_import.load_hf_folder(path) if hf_import.is_hf_clip_state_dict(keys) else None


def build_backbone(name, pretrained=True, pretrained_path=None, quick_gelu=None, clip_config=None):
    """(open_clip CLIP model, tokenizer, image size, clip_config) for one of CLIP_MODELS, or for
    an architecture given as open_clip kwargs (`clip_config`, as iqa.clip.hf_import builds them).

    quick_gelu: the MLP activation of both towers. None = QuickGELU when OpenAI's weights are
    loaded (pretrained, or --pretrained_path), GELU otherwise: OpenAI trained with QuickGELU, while
    'nano' and --no_pretrained runs keep the GELU they were always built with, so their numbers do
    not change. pretrained_path: an open_clip weights file, or a local Hugging Face CLIPModel folder
    or weights file (its architecture and activation then come from its config.json / weights).
    The returned clip_config is None for a named model, else the architecture that was built."""
    import open_clip
    from iqa.clip import hf_import
    if pretrained_path:
        path = os.path.expanduser(str(pretrained_path))
        if not os.path.exists(path):
            raise PretrainedWeightsError(f'--pretrained_path {pretrained_path}: no such file or folder')
        imported = hf_weights(path)
        if imported is not None:
            state_dict, clip_config = imported
            if quick_gelu is not None:
                clip_config = dict(clip_config, quick_gelu=bool(quick_gelu))
            clip = _load_into(hf_import.build_open_clip(clip_config), state_dict, path)
            return (clip, build_tokenizer(name, clip_config['text_cfg']['context_length']),
                    _image_size(clip), clip_config)
    if clip_config:
        clip_config = dict(clip_config, quick_gelu=bool(clip_config.get('quick_gelu', False)
                                                        if quick_gelu is None else quick_gelu))
        clip = hf_import.build_open_clip(clip_config)
        return clip, build_tokenizer(name, clip_config['text_cfg']['context_length']), _image_size(clip), clip_config
    name = canonical_name(name)
    if name == 'nano':
        if pretrained or pretrained_path:
            raise PretrainedWeightsError("the 'nano' CLIP has no pretrained weights (it is for tests and the "
                                         'demo): pass --no_pretrained')
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        clip = CLIP(embed_dim=NANO_CONFIG['embed_dim'], vision_cfg=CLIPVisionCfg(**NANO_CONFIG['vision_cfg']),
                    text_cfg=CLIPTextCfg(**NANO_CONFIG['text_cfg']), quick_gelu=bool(quick_gelu))
        context = NANO_CONFIG['text_cfg']['context_length']
    else:
        if quick_gelu is None:
            quick_gelu = bool(pretrained or pretrained_path)
        oc_name = hf_import.openai_model_name(name) if quick_gelu else CLIP_MODELS[name]
        if pretrained_path:
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
    return clip, build_tokenizer(name, context), _image_size(clip), None


def _image_size(clip):
    size = clip.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def uses_quick_gelu(clip):
    """True when the towers' MLPs run QuickGELU (what OpenAI's weights were trained with)."""
    from open_clip.transformer import QuickGELU
    return isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)


def build_tokenizer(name, context_length=None):
    """open_clip's BPE tokenizer (its vocabulary ships with the package: works offline). All our
    models share OpenAI CLIP's vocabulary; only the context length differs (nano: 32, else 77;
    an imported architecture: its own)."""
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
                 bound='clamp', quick_gelu=None, clip_config=None):
        """clip_model: a name of CLIP_MODELS or a local Hugging Face CLIPModel folder / weights file
        (then loaded as --pretrained_path). quick_gelu, clip_config: see build_backbone."""
        super().__init__()
        if bound not in BOUNDS:
            raise ValueError(f'bound must be one of {BOUNDS}, got {bound!r}')
        if is_local_weights(clip_model) and clip_model not in CLIP_MODELS:
            if pretrained_path:
                raise PretrainedWeightsError(f'the model {clip_model} is a local folder or file and '
                                             f'--pretrained_path {pretrained_path} another: give one')
            pretrained_path, clip_model = clip_model, None
        elif not clip_config:
            clip_model = canonical_name(clip_model)
        self.clip, self.tokenizer, self.image_size, clip_config = build_backbone(
            clip_model, pretrained, pretrained_path, quick_gelu=quick_gelu, clip_config=clip_config)
        if clip_config:
            from iqa.clip import hf_import
            clip_model = hf_import.named_model(clip_config) or 'custom'
        self.config = dict(clip_model=clip_model, residual=bool(residual),
                           residual_scale_q=float(residual_scale_q), residual_scale_c=float(residual_scale_c),
                           dropout=float(dropout), use_two_branch=bool(use_two_branch),
                           use_refinement=bool(use_refinement), refinement_layers=int(refinement_layers),
                           refinement_heads=int(refinement_heads), refinement_dim=int(refinement_dim),
                           bound=bound, quick_gelu=uses_quick_gelu(self.clip))
        if clip_config:
            self.config['clip_config'] = clip_config
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
        """Scores from the embeddings, always in float32: under bf16 autocast (8 mantissa bits) the
        quality head's output would take only a few dozen distinct values near its sigmoid's
        middle, so the heads run with autocast off, as the original's fp32 evaluation did."""
        with torch.autocast(img.device.type, enabled=False):
            return self._heads(img.float(), txt.float())

    def _heads(self, img, txt):
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
        with torch.autocast(img.device.type, enabled=False):   # a head: fp32, as heads()
            img, txt = img.float(), txt.float()
            cos = (img * txt).sum(-1, keepdim=True)
            pred = F.normalize(self.rationale_head(torch.cat([img, txt, cos], dim=1)), dim=-1)
            return F.mse_loss(pred, explanation_emb.float())

    # ------------------------------------------------------------------ parameter groups
    def backbone_parameters(self):
        return [p for p in self.clip.parameters() if p.requires_grad]

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith('clip.') and p.requires_grad]

    def freeze(self, freeze_clip=False, partial_freeze=False, freeze_layers=8, freeze_ln_pre=False, warn=print):
        """--freeze_clip: both towers frozen. --partial_freeze --freeze_layers N: as the original
        meant it (its own code stops with an AttributeError before reaching this): each tower's
        embeddings (vision: patch conv, class and position embeddings; text: token and position
        embeddings) and its first N transformer blocks; N at or above a tower's depth freezes all
        its blocks (ViT-L/14 at 18: 18 of 24 vision blocks, all 12 text blocks). The vision
        tower's ln_pre is no embedding and trains, as in the original; freeze_ln_pre freezes it
        too (make demo-clip does: its published numbers were measured so).
        Returns a one-line description for the log."""
        if freeze_clip:
            self.clip.requires_grad_(False)
            return 'CLIP frozen (both towers); only the heads train'
        if not partial_freeze:
            return 'CLIP fully trainable'
        if freeze_layers < 0:
            raise ValueError(f'--freeze_layers must be >= 0, got {freeze_layers}')
        visual, used = self.clip.visual, {}
        towers = {'vision': (visual.transformer.resblocks,
                             [visual.conv1, visual.class_embedding, visual.positional_embedding]
                             + ([visual.ln_pre] if freeze_ln_pre else [])),
                  'text': (self.clip.transformer.resblocks,
                           [self.clip.token_embedding, self.clip.positional_embedding])}
        for tower, (blocks, embeddings) in towers.items():
            n = min(freeze_layers, len(blocks))
            if freeze_layers >= len(blocks):
                warn(f'--freeze_layers {freeze_layers}: the {tower} tower has {len(blocks)} blocks; all of them '
                     'are frozen (only its final layer norm and projection train)')
            for e in embeddings:
                e.requires_grad_(False)
            for block in blocks[:n]:
                block.requires_grad_(False)
            used[tower] = (n, len(blocks))
        return (f'CLIP partially frozen: embeddings{" + ln_pre" if freeze_ln_pre else ""} + first ' +
                ', '.join(f'{n}/{total} {tower} blocks' for tower, (n, total) in used.items()))

    def model_config(self):
        return dict(self.config)


def build_from_config(config, pretrained=False):
    """A ClipQualityModel from a checkpoint's model config (random weights, no download).

    A config without 'quick_gelu' was written before the activation was stored: those models were
    all built with GELU and trained so, hence they are rebuilt with GELU."""
    keys = ('clip_model', 'residual', 'residual_scale_q', 'residual_scale_c', 'dropout', 'use_two_branch',
            'use_refinement', 'refinement_layers', 'refinement_heads', 'refinement_dim', 'bound', 'clip_config')
    kwargs = {k: config[k] for k in keys if k in config}
    return ClipQualityModel(pretrained=pretrained, quick_gelu=bool(config.get('quick_gelu', False)), **kwargs)


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
