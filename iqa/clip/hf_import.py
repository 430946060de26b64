"""Weights of the user's original program (baseline.py, a Hugging Face `transformers.CLIPModel`)
imported into an open_clip `CLIP` and our quality / consistency heads.

    hf_to_open_clip(sd)               HF CLIPModel state_dict -> open_clip CLIP state_dict
    open_clip_config_from_hf(...)     HF config.json and/or weights -> open_clip CLIP kwargs (+ quick_gelu)
    named_model(clip_config)          'ViT-B/32' | 'ViT-B/16' | 'ViT-L/14' when the shapes are one of those
    openai_model_name(name)           open_clip's QuickGELU config name for OpenAI weights ('ViT-L-14-quickgelu')
    build_open_clip(clip_config)      the open_clip CLIP for a config (random weights, no download)
    load_checkpoint_file(path)        torch.load of a baseline.py file without unpickling arbitrary code
    import_baseline_checkpoint(obj)   baseline.py's best/last file -> (backbone sd, heads sd, config, notes)
    load_hf_folder(path)              a local HF model folder or weights file -> (open_clip sd, clip_config)

OpenAI's CLIP (and every HF `CLIPModel` built from it, `hidden_act="quick_gelu"`) runs QuickGELU,
x * sigmoid(1.702 x), in every MLP of both towers. open_clip's plain `ViT-*` configs use exact GELU,
so those weights must be loaded into a `quick_gelu=True` model or every block computes another
function. Nothing here needs `transformers`: HF files are read as plain tensors.
"""
import json
import math
import os
import re

import torch

# our model names -> open_clip's configs of the same shapes (models.CLIP_MODELS holds the same pairs)
OPENAI_MODELS = {'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16', 'ViT-L/14': 'ViT-L-14'}
_HF_NAMES = {'openai/clip-vit-base-patch32': 'ViT-B/32', 'openai/clip-vit-base-patch16': 'ViT-B/16',
             'openai/clip-vit-large-patch14': 'ViT-L/14'}
# the Hugging Face CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: a config.json may omit them
_HF_TEXT_DEFAULTS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=77, vocab_size=49408, hidden_act='quick_gelu')
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act='quick_gelu')
_HF_PROJECTION_DIM = 512
_OPENAI_HEAD_WIDTH = 64   # every OpenAI CLIP has 64-wide attention heads in both towers

_LAYER = re.compile(r'^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$')
_BLOCK_PREFIX = {'vision_model': 'visual.transformer.resblocks', 'text_model': 'transformer.resblocks'}
_BLOCK_RENAME = {'layer_norm1.': 'ln_1.', 'layer_norm2.': 'ln_2.', 'mlp.fc1.': 'mlp.c_fc.',
                 'mlp.fc2.': 'mlp.c_proj.', 'self_attn.out_proj.': 'attn.out_proj.'}
_QKV = re.compile(r'^self_attn\.([qkv])_proj\.(weight|bias)$')
_RENAME = {
    'vision_model.embeddings.class_embedding': 'visual.class_embedding',
    'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
    'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
    'vision_model.pre_layrnorm.weight': 'visual.ln_pre.weight',
    'vision_model.pre_layrnorm.bias': 'visual.ln_pre.bias',
    'vision_model.post_layernorm.weight': 'visual.ln_post.weight',
    'vision_model.post_layernorm.bias': 'visual.ln_post.bias',
    'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
    'text_model.embeddings.position_embedding.weight': 'positional_embedding',
    'text_model.final_layer_norm.weight': 'ln_final.weight',
    'text_model.final_layer_norm.bias': 'ln_final.bias',
    'logit_scale': 'logit_scale',
}
_TRANSPOSE = {'visual_projection.weight': 'visual.proj', 'text_projection.weight': 'text_projection'}
# buffers HF rebuilds itself (saved by older transformers versions); open_clip has no counterpart
_DROPPED = ('vision_model.embeddings.position_ids', 'text_model.embeddings.position_ids')


class CheckpointImportError(ValueError):
    """A file or state_dict is not what the importer expects; the message names the file and keys."""


def _name_keys(keys, limit=8):
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')


def _where(source):
    return f'{source}: ' if source else ''


def is_hf_clip_state_dict(state_dict):
    """True when the keys are a Hugging Face CLIPModel's (both towers' embeddings present)."""
    return ('vision_model.embeddings.patch_embedding.weight' in state_dict
            and 'text_model.embeddings.token_embedding.weight' in state_dict)


def hf_to_open_clip(state_dict, source=None):
    """An open_clip CLIP state_dict from a Hugging Face CLIPModel state_dict.

    Per block the separate q/k/v projections become one `in_proj_weight`/`in_proj_bias` in the order
    q, k, v (nn.MultiheadAttention's packing); the projections are nn.Linear weights in HF
    (out x in) and plain matrices applied as x @ P in open_clip, hence transposed. Keys this
    mapping does not know raise CheckpointImportError naming them (`source`, a file name, is
    put in the message)."""
    out, qkv, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key in _DROPPED:
            continue
        if key in _RENAME:
            out[_RENAME[key]] = value
            continue
        if key in _TRANSPOSE:
            out[_TRANSPOSE[key]] = value.t().contiguous()
            continue
        m = _LAYER.match(key)
        if m is None:
            unknown.append(key)
            continue
        tower, index, rest = m.group(1), int(m.group(2)), m.group(3)
        prefix = f'{_BLOCK_PREFIX[tower]}.{index}.'
        proj = _QKV.match(rest)
        if proj:
            qkv.setdefault((prefix, proj.group(2)), {})[proj.group(1)] = value
            continue
        for old, new in _BLOCK_RENAME.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointImportError(f'{_where(source)}not a Hugging Face CLIPModel state_dict: '
                                    f'unknown keys {_name_keys(unknown)}')
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {'q', 'k', 'v'}:
            raise CheckpointImportError(f'{_where(source)}block {prefix} has only the {sorted(parts)} '
                                        f'projections of q, k, v ({kind})')
        out[f'{prefix}attn.in_proj_{kind}'] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    missing = [k for k in list(_RENAME.values()) + list(_TRANSPOSE.values()) if k not in out]
    if missing:
        raise CheckpointImportError(f'{_where(source)}incomplete Hugging Face CLIPModel state_dict: '
                                    f'no weights for {_name_keys(missing)}')
    return out


# ---------------------------------------------------------------------------------------------- config
def _layer_count(state_dict, tower):
    indices = {int(m.group(2)) for m in map(_LAYER.match, state_dict) if m and m.group(1) == tower}
    if indices != set(range(len(indices))):
        raise CheckpointImportError(f'{tower}: blocks {sorted(indices)} are not numbered 0..N-1')
    return len(indices)


def _from_weights(state_dict):
    """What the shapes say: {'text': {...}, 'vision': {...}, 'projection_dim': d} in HF's field names."""
    sd = state_dict
    text_width = sd['text_model.embeddings.token_embedding.weight'].shape[1]
    vision_width = sd['vision_model.embeddings.class_embedding'].shape[0]
    patch = sd['vision_model.embeddings.patch_embedding.weight'].shape[-1]
    positions = sd['vision_model.embeddings.position_embedding.weight'].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointImportError(f'{positions} vision positions: not a square grid plus the class token')
    return {
        'text': dict(hidden_size=text_width,
                     intermediate_size=sd['text_model.encoder.layers.0.mlp.fc1.weight'].shape[0],
                     num_hidden_layers=_layer_count(sd, 'text_model'),
                     max_position_embeddings=sd['text_model.embeddings.position_embedding.weight'].shape[0],
                     vocab_size=sd['text_model.embeddings.token_embedding.weight'].shape[0]),
        'vision': dict(hidden_size=vision_width,
                       intermediate_size=sd['vision_model.encoder.layers.0.mlp.fc1.weight'].shape[0],
                       num_hidden_layers=_layer_count(sd, 'vision_model'),
                       image_size=grid * patch, patch_size=patch),
        'projection_dim': sd['text_projection.weight'].shape[0],
    }


def _activation(text, vision):
    acts = {text.get('hidden_act', 'quick_gelu'), vision.get('hidden_act', 'quick_gelu')}
    if acts == {'quick_gelu'}:
        return True
    if acts == {'gelu'}:
        return False
    raise CheckpointImportError(f'hidden_act {sorted(acts)}: only quick_gelu or gelu (both towers alike) '
                                'can be built with open_clip')


def open_clip_config_from_hf(hf_config=None, state_dict=None, source=None):
    """open_clip CLIP kwargs {embed_dim, vision_cfg, text_cfg, quick_gelu} for a HF CLIPModel.

    `hf_config`: the dict of a HF config.json (or CLIPConfig.to_dict()); `state_dict`: its weights
    (HF keys). Either may be None. Layer counts, widths, MLP ratios, patch and image size, context
    length and vocabulary are read from the weights where given (a config that disagrees with them
    raises); the head count is not in the weights: it comes from the config, else from OpenAI's
    64-wide heads. The activation is QuickGELU unless the config says `hidden_act: gelu` (HF's
    default, and OpenAI's weights, are QuickGELU)."""
    if hf_config is None and state_dict is None:
        raise ValueError('open_clip_config_from_hf needs a HF config, a state_dict, or both')
    if hf_config is not None and 'text_model.embeddings.token_embedding.weight' in hf_config:
        hf_config, state_dict = None, hf_config     # a state_dict passed as the first argument
    cfg = hf_config or {}
    stated = {t: cfg.get(f'{t}_config') or cfg.get(f'{t}_config_dict') or {} for t in ('text', 'vision')}
    text = dict(_HF_TEXT_DEFAULTS, **stated['text'])
    vision = dict(_HF_VISION_DEFAULTS, **stated['vision'])
    projection_dim = cfg.get('projection_dim', _HF_PROJECTION_DIM)
    if state_dict is not None:
        shapes = _from_weights(state_dict)
        for tower in ('text', 'vision'):
            for key, seen in shapes[tower].items():
                if key in stated[tower] and int(stated[tower][key]) != int(seen):
                    raise CheckpointImportError(f'{_where(source)}config.json says {tower}_config.{key}='
                                                f'{stated[tower][key]} but the weights have {seen}')
        text.update(shapes['text'])
        vision.update(shapes['vision'])
        projection_dim = shapes['projection_dim']
        if hf_config is None:   # heads are not in the weights: OpenAI's 64-wide heads
            text['num_attention_heads'] = max(1, text['hidden_size'] // _OPENAI_HEAD_WIDTH)
            vision['num_attention_heads'] = max(1, vision['hidden_size'] // _OPENAI_HEAD_WIDTH)
    for tower, c in (('text', text), ('vision', vision)):
        if c['hidden_size'] % c['num_attention_heads']:
            raise CheckpointImportError(f'{_where(source)}{tower} width {c["hidden_size"]} is not divisible by '
                                        f'{c["num_attention_heads"]} heads')
    return dict(
        embed_dim=int(projection_dim),
        vision_cfg=dict(image_size=int(vision['image_size']), layers=int(vision['num_hidden_layers']),
                        width=int(vision['hidden_size']),
                        head_width=int(vision['hidden_size'] // vision['num_attention_heads']),
                        patch_size=int(vision['patch_size']),
                        mlp_ratio=vision['intermediate_size'] / vision['hidden_size']),
        text_cfg=dict(context_length=int(text['max_position_embeddings']), vocab_size=int(text['vocab_size']),
                      width=int(text['hidden_size']), heads=int(text['num_attention_heads']),
                      layers=int(text['num_hidden_layers']),
                      mlp_ratio=text['intermediate_size'] / text['hidden_size']),
        quick_gelu=_activation(text, vision),
    )


def _open_clip_shapes(config):
    """The fields that decide a CLIP's weights' shapes, with open_clip's defaults filled in."""
    v, t = config['vision_cfg'], config['text_cfg']
    return (config['embed_dim'], v['image_size'], v['layers'], v['width'], v.get('head_width', 64),
            v['patch_size'], float(v.get('mlp_ratio', 4.0)), t['context_length'], t['vocab_size'],
            t['width'], t['heads'], t['layers'], float(t.get('mlp_ratio', 4.0)))


def named_model(clip_config):
    """Our model name ('ViT-L/14', ...) whose open_clip config has these shapes, else None."""
    import open_clip
    shapes = _open_clip_shapes(clip_config)
    for ours, theirs in OPENAI_MODELS.items():
        if _open_clip_shapes(open_clip.get_model_config(theirs)) == shapes:
            return ours
    return None


def openai_model_name(name):
    """open_clip's config name to build `name` for OpenAI's weights: the QuickGELU variant
    ('ViT-L/14', 'ViT-L-14' or 'openai/clip-vit-large-patch14' -> 'ViT-L-14-quickgelu').
    `open_clip.create_model('ViT-L-14', pretrained='openai')` only warns about the mismatch and
    builds GELU blocks; `create_model(openai_model_name(...), pretrained='openai')` builds what
    OpenAI trained."""
    import open_clip
    ours = _HF_NAMES.get(name, name)
    base = OPENAI_MODELS.get(ours, ours)
    if base not in OPENAI_MODELS.values():
        raise ValueError(f'{name!r} has no OpenAI weights: expected one of {", ".join(OPENAI_MODELS)}')
    quick = base + '-quickgelu'
    if quick not in open_clip.list_models():
        raise ValueError(f'open_clip {open_clip.__version__} has no config {quick!r}')
    return quick


def build_open_clip(clip_config):
    """An open_clip CLIP (random weights, nothing downloaded) from open_clip_config_from_hf's dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    return CLIP(embed_dim=clip_config['embed_dim'], vision_cfg=CLIPVisionCfg(**clip_config['vision_cfg']),
                text_cfg=CLIPTextCfg(**clip_config['text_cfg']), quick_gelu=bool(clip_config['quick_gelu']))


# --------------------------------------------------------------------------------------------- files
def _numpy_safe_globals():
    """What a pickled numpy scalar needs: baseline.py stores `best_sc` (scipy's spearmanr, a
    numpy.float64). The reconstructor is named numpy._core.multiarray.scalar by numpy 2 and
    numpy.core.multiarray.scalar by numpy 1, so it is allowed under both names."""
    import numpy as np
    try:
        from numpy._core.multiarray import scalar
    except ImportError:   # numpy 1
        from numpy.core.multiarray import scalar
    allowed = [scalar, (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'),
               np.dtype]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        allowed += [dtypes.Float64DType, dtypes.Float32DType, dtypes.Int64DType]
    return allowed


def load_checkpoint_file(path, map_location='cpu'):
    """torch.load of a file baseline.py wrote, with weights_only=True.

    baseline.py's full checkpoints hold `best_sc` as a numpy.float64, which the default
    `weights_only=True` unpickler refuses; `weights_only=False` would accept it but also runs any
    code a pickle names. Only numpy's scalar reconstructor and dtypes are added to the allowed
    globals, so a file is still read as data."""
    if not os.path.isfile(path):
        raise CheckpointImportError(f'{path}: no such file')
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # pickle errors come in many types; the message says what failed
            raise CheckpointImportError(f'{path}: cannot be read as a weights file: '
                                        f'{type(err).__name__}: {str(err)[:300]}') from err


def _load_weights_file(path):
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    return load_checkpoint_file(path)


_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def load_hf_folder(path):
    """(open_clip state_dict, clip_config) from a local Hugging Face CLIPModel: a folder holding
    config.json and model.safetensors / pytorch_model.bin (or their sharded *.index.json form), or
    one weights file (its folder's config.json is used when there is one), as `CLIP_MODEL_NAME` and
    `--pretrained_path` pass it."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        files = []
        for name in _WEIGHT_FILES:
            index = os.path.join(path, name + '.index.json')
            if os.path.isfile(os.path.join(path, name)):
                files = [os.path.join(path, name)]
            elif os.path.isfile(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)['weight_map'].values()))
                files = [os.path.join(path, s) for s in shards]
            if files:
                break
        if not files:
            raise CheckpointImportError(f'{path}: no {" or ".join(_WEIGHT_FILES)} (sharded or not) in this folder '
                                        f'(it holds: {", ".join(sorted(os.listdir(path))[:10]) or "nothing"})')
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CheckpointImportError(f'{path}: no such file or folder')
    state_dict = {}
    for f in files:
        part = _load_weights_file(f)
        if isinstance(part, dict) and (isinstance(part.get('model'), dict) or any(k.startswith('clip.') for k in part)):
            raise CheckpointImportError(f'{f}: a baseline.py checkpoint (CLIP + heads), not a Hugging Face CLIPModel: '
                                        'import it as a checkpoint (import_baseline_checkpoint)')
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointImportError(f'{f}: not a state_dict of tensors')
        state_dict.update(part)
    if not is_hf_clip_state_dict(state_dict):
        raise CheckpointImportError(f'{path}: not a Hugging Face CLIPModel (no vision_model/text_model '
                                    f'embeddings); its keys begin {_name_keys(list(state_dict)[:5])}')
    config_path = os.path.join(folder, 'config.json')
    hf_config = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
    return (hf_to_open_clip(state_dict, source=path),
            open_clip_config_from_hf(hf_config, state_dict, source=config_path if hf_config else path))


# ------------------------------------------------------------------------------------- baseline.py
# heads of baseline.py's BaselineCLIPScore kept under our names, per mode
_RESIDUAL_HEADS = ('q_base_head.', 'q_delta_head.', 'c_base_scale', 'c_base_bias', 'c_delta_head.', 'rationale_head.')
_DIRECT_HEADS = ('q_head.', 'c_head.', 'rationale_head.')
# built by the original but unused by its forward as main() calls it (the forward's keyword
# switches are never passed; the delta mixer weights its one branch by g / max(g, 1e-6), which is 1
# unless the gate's logit is below -13.8)
_UNUSED_HEADS = ('quality_gate.', 'moe_experts.', 'moe_gate.', 'ext_inter_proj.', 'res_seq_proj_img.',
                 'res_seq_proj_txt.', 'tp_img_proj.', 'tp_txt_proj.', 'tp_score_head.', 'tp_cross_img_in.',
                 'tp_cross_txt_in.', 'tp_cross_encoder.', 'tp_cross_delta.', 'delta_gate_mlp.', 'delta_gate_heads.',
                 'img_adapter.', 'txt_adapter.', 'film_gamma.', 'film_beta.', 'filip_scale', 'filip_bias',
                 'seq_proj_img.', 'seq_proj_txt.')
# present only when the original was built with a switch our model does not implement
_UNSUPPORTED_HEADS = {'cross_in.': '--use_cross_attn_delta', 'cross_encoder.': '--use_cross_attn_delta',
                      'cross_delta.': '--use_cross_attn_delta', 'conf_gate.': '--use_confidence_gate',
                      'q_patch_pool.': '--use_token_quality', 'q_seq_proj_img.': '--use_token_quality'}


def _starts(key, prefixes):
    """`key` is under a module prefix ('name.') or is the parameter 'name'."""
    return any(key.startswith(p) if p.endswith('.') else key == p for p in prefixes)


def import_baseline_checkpoint(obj, hf_config=None, use_two_branch=None, refinement_heads=8,
                               residual_scale_q=0.2, residual_scale_c=0.2):
    """Import what baseline.py saves: the bare best state_dict (`torch.save(model.state_dict())`,
    keys `clip.*` + heads) or a full checkpoint ({"model", "optimizer", "scheduler", "epoch",
    "best_sc", "timestamp"}: baseline_last.pt and baseline_best.pt), given loaded or as a path.

    Returns (backbone, heads, config, notes): backbone an open_clip CLIP state_dict; heads a
    state_dict for our ClipQualityModel's heads (refinement_module.* renamed refinement.*);
    config {clip_model (a named model or None), clip_config (open_clip kwargs, quick_gelu
    included), residual, use_two_branch, use_refinement, refinement_*, residual_scale_q/c}; notes,
    lines for the log: what was dropped and what the file cannot tell.

    The weights do not record residual_scale_q/c (taken from the arguments, the original's 0.2 by
    default), the refinement's head count (the original's default 8) or --use_two_branch in direct
    mode (its c_scale/c_bias exist either way; default off, as the original's). Nor do they record
    --use_token_patch_cross (its tp_* heads are built either way): such a file is scored without
    that branch. Heads the original
    builds but its forward never uses are dropped and listed; heads of switches our model lacks
    raise CheckpointImportError."""
    source = None
    if isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        obj = load_checkpoint_file(source)
    notes = []
    if not isinstance(obj, dict):
        raise CheckpointImportError(f'{_where(source)}not a baseline.py checkpoint: a {type(obj).__name__}')
    state = obj
    if isinstance(obj.get('model'), dict):
        state = obj['model']
        if obj.get('optimizer') is not None:
            notes.append('optimizer state not carried over (a new run starts a new optimizer)')
        if obj.get('scheduler') is not None:
            notes.append('scheduler state not carried over')
        if 'epoch' in obj:
            best = obj.get('best_sc')
            notes.append(f'the original had trained {int(obj["epoch"])} epochs'
                         + (f' (its best val SROCC_C {float(best):.4f})' if best is not None else ''))
    clip_sd = {k[len('clip.'):]: v for k, v in state.items() if k.startswith('clip.')}
    if not clip_sd:
        raise CheckpointImportError(f'{_where(source)}not a baseline.py checkpoint (no clip.* keys); its keys '
                                    f'begin {_name_keys(list(state)[:5])}')
    if not is_hf_clip_state_dict(clip_sd):
        raise CheckpointImportError(f'{_where(source)}its clip.* weights are not a Hugging Face CLIPModel')
    backbone = hf_to_open_clip(clip_sd, source=source)
    clip_config = open_clip_config_from_hf(hf_config, clip_sd, source=source)
    if hf_config is None:
        notes.append('architecture read from the weights; heads assumed 64 wide (OpenAI CLIP), '
                     'QuickGELU (the original loads OpenAI weights)')

    rest = {k: v for k, v in state.items() if not k.startswith('clip.')}
    unsupported = sorted({flag for k in rest for p, flag in _UNSUPPORTED_HEADS.items() if _starts(k, (p,))})
    if unsupported:
        raise CheckpointImportError(f'{_where(source)}trained with {", ".join(unsupported)}, which this '
                                    'program does not implement: its scores cannot be reproduced here')
    residual = any(k.startswith('q_base_head.') for k in rest)
    use_refinement = any(k.startswith('refinement_module.') for k in rest)
    if residual:
        kept = _RESIDUAL_HEADS
        if use_two_branch:
            notes.append('--use_two_branch has no effect in residual mode (as in the original)')
        use_two_branch = False
    else:
        if use_two_branch is None:
            notes.append('direct mode: whether the original ran --use_two_branch is not in the weights; '
                         'assumed off (pass it to change)')
        use_two_branch = bool(use_two_branch)
        kept = _DIRECT_HEADS + (('c_scale', 'c_bias') if use_two_branch else ())
    heads, dropped, unknown = {}, set(), []
    for key, value in rest.items():
        if _starts(key, kept):
            heads[key] = value
        elif not residual and key.startswith('refinement_module.'):
            heads['refinement.' + key[len('refinement_module.'):]] = value
        elif _starts(key, _UNUSED_HEADS) or (not residual and key in ('c_scale', 'c_bias')):
            dropped.add(key.split('.')[0])
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointImportError(f'{_where(source)}keys baseline.py does not write: {_name_keys(unknown)}')
    missing = [p.rstrip('.') for p in kept if not any(_starts(k, (p,)) for k in heads)]
    if missing:
        raise CheckpointImportError(f'{_where(source)}incomplete baseline.py checkpoint: no {", ".join(missing)}')
    if dropped:
        notes.append('dropped (built by the original, unused by its forward): ' + ', '.join(sorted(dropped)))
    config = dict(clip_model=named_model(clip_config), clip_config=clip_config, residual=residual,
                  use_two_branch=use_two_branch, use_refinement=use_refinement,
                  residual_scale_q=float(residual_scale_q), residual_scale_c=float(residual_scale_c))
    if use_refinement:
        layers = {int(k.split('.')[3]) for k in heads if k.startswith('refinement.transformer.layers.')}
        config.update(refinement_layers=len(layers), refinement_heads=int(refinement_heads),
                      refinement_dim=int(heads['refinement.input_proj.0.weight'].shape[0]))
        notes.append(f'refinement heads not in the weights: {refinement_heads} used'
                     + (" (the original's default)" if int(refinement_heads) == 8 else ''))
    return backbone, heads, config, notes
