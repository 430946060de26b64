"""Weights files of the user's original program (baseline.py) used by this one: scored by
cross_dataset_test.py, a new run started from them (train_clip.py --init_from), and a clear refusal
where they cannot serve (train_clip.py --resume_from).

    is_baseline_file(path)              a file baseline.py wrote (bare best state_dict or full checkpoint)
    import_baseline_model(path, ...)    (ClipQualityModel with its weights, notes) from such a file
    init_model(path, args)              --init_from: the model of a new run, the flags it fixed, notes
    refuse_foreign_resume(path)         --resume_from on a baseline.py file stops with a pointer to --init_from

The weights carry the towers' shapes (layer counts, widths, patch and image size) but not the
attention head count (OpenAI's 64-wide heads are assumed; a Hugging Face config.json, given as
--clip_model, says it), nor a few of the original's switches (see hf_import.import_baseline_checkpoint).
"""
import os

import torch

from iqa.clip import hf_import
from iqa.clip import models as models_clip

# the format marker of train_clip.py's checkpoints (iqa.clip.evaluation.CLIP_CHECKPOINT_FORMAT)
_OURS = 'clip-iqa-checkpoint/1'


def _peek(path):
    """The file's top-level object, memory-mapped (tensors are not read); None when unreadable."""
    try:
        with torch.serialization.safe_globals(hf_import._numpy_safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:   # not a zip checkpoint or not weights-only: not a file of baseline.py's
        return None


def is_baseline_file(path):
    """True when `path` is what baseline.py saves: a state_dict with the Hugging Face towers under
    clip.*, bare or as the 'model' of {model, optimizer, scheduler, epoch, best_sc, timestamp}."""
    if not os.path.isfile(path):
        return False
    obj = _peek(path)
    if not isinstance(obj, dict) or obj.get('format') == _OURS:
        return False
    state = obj['model'] if isinstance(obj.get('model'), dict) else obj
    return hf_import.is_hf_clip_state_dict({k[len('clip.'):] for k in state if isinstance(k, str)
                                            and k.startswith('clip.')})


def _hf_config_for(clip_model):
    """(config.json dict or None, model name or None) for --clip_model: a local Hugging Face folder
    gives its config.json (the head counts the weights do not hold), a name is checked against the
    weights."""
    if not clip_model:
        return None, None
    if os.path.isdir(str(clip_model)):
        import json
        config = os.path.join(clip_model, 'config.json')
        if os.path.isfile(config):
            with open(config) as f:
                return json.load(f), None
        return None, None
    name = models_clip.canonical_name(clip_model)
    return None, (None if name == 'nano' else name)


def import_baseline_model(path, clip_model=None, residual_scale_q=0.2, residual_scale_c=0.2,
                          refinement_heads=8, use_two_branch=None, dropout=0.1, bound='clamp'):
    """(ClipQualityModel holding the file's weights, in eval mode; notes for the log).

    The architecture is read from the weights; `clip_model` (a name or a local Hugging Face
    folder) is what the original was told (its CLIP_MODEL_NAME): a folder supplies its config.json,
    a name must agree with the weights (hf_import.CheckpointImportError otherwise)."""
    hf_config, expected = _hf_config_for(clip_model)
    backbone, heads, config, notes = hf_import.import_baseline_checkpoint(
        path, hf_config=hf_config, use_two_branch=use_two_branch, refinement_heads=refinement_heads,
        residual_scale_q=residual_scale_q, residual_scale_c=residual_scale_c)
    if expected and config['clip_model'] != expected:
        raise hf_import.CheckpointImportError(
            f'{path}: its weights are a {config["clip_model"] or "CLIP of other shapes"}, not the --clip_model '
            f'{expected} given')
    kwargs = {k: config[k] for k in ('residual', 'use_two_branch', 'use_refinement', 'residual_scale_q',
                                     'residual_scale_c', 'refinement_layers', 'refinement_heads',
                                     'refinement_dim') if k in config}
    model = models_clip.ClipQualityModel(config['clip_model'] or 'custom', pretrained=False,
                                         clip_config=config['clip_config'], dropout=dropout, bound=bound, **kwargs)
    model.load_state_dict({**{'clip.' + k: v for k, v in backbone.items()}, **heads}, strict=True)
    return model.eval(), notes


# flags of train_clip.py a model config fixes: (flag, model_config key, flag value from the config)
_ARCH_FLAGS = (('no_residual_learning', 'residual', lambda v: not v), ('use_two_branch', 'use_two_branch', bool),
               ('use_refinement', 'use_refinement', bool), ('refinement_layers', 'refinement_layers', int),
               ('refinement_heads', 'refinement_heads', int), ('refinement_dim', 'refinement_dim', int),
               ('residual_scale_q', 'residual_scale_q', float), ('residual_scale_c', 'residual_scale_c', float))


def init_model(path, args):
    """--init_from: (model holding the file's weights, notes). `path`: a baseline.py file (bare best
    state_dict, baseline_best.pt, baseline_last.pt) or a train_clip.py checkpoint (best or last).

    The weights decide the architecture: the model flags of `args` that differ from it are set to
    the file's (each named in the notes), so config.json describes the model that trains. Dropout
    and --bound are training settings and stay as given. Only weights are taken: the optimizer,
    the schedule and the epoch count start anew."""
    try:
        return _init_model(path, args)
    except hf_import.CheckpointImportError as err:   # train_clip.py reports these and exits 2
        raise models_clip.PretrainedWeightsError(str(err)) from err


def _init_model(path, args):
    notes = []
    if not os.path.isfile(path):
        raise hf_import.CheckpointImportError(f'--init_from {path}: no such file')
    if is_baseline_file(path):
        model, notes = import_baseline_model(
            path, clip_model=None, residual_scale_q=args.residual_scale_q, residual_scale_c=args.residual_scale_c,
            refinement_heads=args.refinement_heads, use_two_branch=args.use_two_branch or None,
            dropout=args.dropout, bound=args.bound)
        notes = [n for n in notes if 'not carried over' not in n]
        source = 'a baseline.py file'
    else:
        obj = _peek(path)
        if not isinstance(obj, dict) or obj.get('format') != _OURS:
            raise hf_import.CheckpointImportError(
                f'--init_from {path}: neither a baseline.py file (clip.* weights of a Hugging Face CLIPModel) '
                'nor a train_clip.py checkpoint')
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        config = dict(ckpt['model_config'], dropout=args.dropout, bound=args.bound)
        model = models_clip.build_from_config(config, pretrained=False)
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt['state_dict'].items()}
        model.load_state_dict(state)
        source = f'a train_clip.py checkpoint (epoch {ckpt.get("epoch")})'
    config = model.config
    changed = []
    for flag, key, value in _ARCH_FLAGS:
        if key in config and getattr(args, flag) != value(config[key]):
            changed.append(f'--{flag} {getattr(args, flag)} -> {value(config[key])}')
            setattr(args, flag, value(config[key]))
    if args.clip_model != config['clip_model']:
        changed.append(f'--clip_model {args.clip_model} -> {config["clip_model"]}')
        args.clip_model = config['clip_model']
    head = [f'--init_from {path}: weights of {source} ({config["clip_model"]}, '
            f'{"QuickGELU" if config["quick_gelu"] else "GELU"}); a NEW run: the optimizer, learning-rate '
            'schedule and epoch count start anew (the file\'s optimizer state, if any, is not carried over)']
    if changed:
        head.append('model flags set by the weights: ' + ', '.join(changed))
    return model, head + notes


def refuse_foreign_resume(path):
    """Stop --resume_from on a baseline.py file before torch.load fails on it: its optimizer and
    scheduler are another program's (transformers' schedule, other parameter groups), so it cannot
    continue a train_clip.py run; its weights can start a new one."""
    if os.path.isfile(path) and is_baseline_file(path):
        raise SystemExit(f'--resume_from {path}: a checkpoint of baseline.py, not of train_clip.py; its optimizer '
                         'and scheduler belong to that program and cannot continue a run here. Start a new '
                         f'run from its weights with:  --init_from {path}')
