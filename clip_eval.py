"""Scoring with a CLIP quality/consistency model, shared by train_clip.py (every epoch) and
cross_dataset_test.py (saved checkpoints), so both score an image exactly the same way.

Checkpoint format (train_clip.py writes it): {"format": "clip-iqa-checkpoint/1", "state_dict",
"model_config" (rebuilds the model offline, models_clip.build_from_config), "config" (the run's
flags), "label_scales", "epoch", "round", "metrics", ...}.
"""
import math
import os

import numpy as np
import torch

import checkpoints
import iqa_metrics
import models_clip
from clip_data import clip_pixels

CLIP_CHECKPOINT_FORMAT = 'clip-iqa-checkpoint/1'


def encode_texts(model, token_ids, device, batch_size=256, amp=False):
    """Normalised text embeddings (N, d) of tokenised texts, without gradients."""
    out = []
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(token_ids), batch_size):
            out.append(model.encode_text(token_ids[i:i + batch_size].to(device)).float())
    return torch.cat(out)


def predict(model, images_u8, prompt_ids, prompt_index, *, batch_size=64, device='cpu', amp=False):
    """(quality, consistency, cosine) numpy arrays, one value per image.

    images_u8: (N, 3, S, S) uint8 at the model's input size; prompt_ids: tokenised unique prompts;
    prompt_index[i]: the row of prompt_ids that belongs to image i. Each unique prompt is
    encoded once per call (AGIQA-3K: 300 prompts for 2982 images)."""
    was_training = model.training
    model.eval()
    txt_all = encode_texts(model, prompt_ids, device, amp=amp)
    prompt_index = torch.as_tensor(np.asarray(prompt_index), dtype=torch.long)
    qs, cs, coss = [], [], []
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        for i in range(0, images_u8.shape[0], batch_size):
            pixels = clip_pixels(images_u8[i:i + batch_size].to(device))
            img = model.encode_image(pixels)
            txt = txt_all[prompt_index[i:i + batch_size].to(device)]
            out = model.heads(img, txt)
            qs.append(out['q'].float().cpu())
            cs.append(out['c'].float().cpu())
            coss.append((img * txt).sum(-1).float().cpu())
    model.train(was_training)
    return torch.cat(qs).double().numpy(), torch.cat(cs).double().numpy(), torch.cat(coss).double().numpy()


def head_metrics(q, c, mos_q, mos_c):
    """{'srcc_q', 'plcc_q', 'krcc_q', 'srcc_c', 'plcc_c', 'krcc_c'} (consistency NaN without mos_c)."""
    out = {f'{k}_q': v for k, v in iqa_metrics.correlations(q, mos_q).items()}
    if mos_c is None:
        out.update({f'{k}_c': math.nan for k in ('srcc', 'plcc', 'krcc')})
    else:
        out.update({f'{k}_c': v for k, v in iqa_metrics.correlations(c, mos_c).items()})
    return out


def is_clip_checkpoint(path):
    """True when `path` is a file train_clip.py wrote (cheap enough: checkpoints are loaded anyway)."""
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get('format') == CLIP_CHECKPOINT_FORMAT


def load_model(path, device='cpu'):
    """(model, checkpoint dict) from a train_clip.py checkpoint; no download (the backbone's
    architecture comes from the stored model_config, its weights from the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CLIP_CHECKPOINT_FORMAT:
        raise ValueError(f'{path} is not a CLIP checkpoint of train_clip.py (format {CLIP_CHECKPOINT_FORMAT!r})')
    model = models_clip.build_from_config(ckpt['model_config'], pretrained=False)
    model.load_state_dict(checkpoints.strip_wrapper_prefixes(ckpt['state_dict']))
    return model.to(device).eval(), ckpt
