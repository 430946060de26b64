"""Scoring with a CLIP quality/consistency model, shared by train_clip.py (every epoch) and
cross_dataset_test.py (saved checkpoints), so both score an image exactly the same way.

Checkpoint format (train_clip.py writes it): {"format": "clip-iqa-checkpoint/1", "state_dict",
"model_config" (rebuilds the model offline, models_clip.build_from_config), "config" (the run's
flags), "label_scales", "epoch", "round", "metrics", ...}.
"""
import glob
import math
import os

import numpy as np
import torch

from iqa.ckpt import strip_wrapper_prefixes
from iqa.files import atomic_write_json, atomic_write_text
import iqa_metrics
import models_clip
from clip_data import clip_pixels

CLIP_CHECKPOINT_FORMAT = 'clip-iqa-checkpoint/1'


def encode_texts(model, token_ids, device, batch_size=256, amp=False):
    """Normalised text embeddings (N, d) of tokenised texts, without gradients."""
    out = []
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
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
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
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
    """True when `path` is a file train_clip.py wrote (memory-mapped: the weights are not read)."""
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
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
    model.load_state_dict(strip_wrapper_prefixes(ckpt['state_dict']))
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------- cross_dataset_test.py

def _image_size(model):
    return int(model.image_size)


def _score_paths(model, paths, prompts, tokenizer, device, amp, batch_size, cache_dir, num_workers):
    """(quality, consistency, kept indices) for image files with their prompts (None = no prompt)."""
    import data_loader
    size = _image_size(model)
    images, kept = data_loader.load_images(paths, resize_hw=(size, size), cache_dir=cache_dir,
                                           num_workers=num_workers, skip_bad=True)
    texts = [prompts[i] if prompts is not None else '' for i in kept]
    unique, index = np.unique(np.array(texts, dtype=object).astype(str), return_inverse=True)
    q, c, _ = predict(model, images, tokenizer(list(unique)), index, batch_size=batch_size, device=device, amp=amp)
    return q, c, kept


def _agiqa_prompts(root):
    """path -> (prompt, mos_align) from an AGIQA-3K data.csv in `root`, or None."""
    import clip_data
    csv_path = os.path.join(root, 'data.csv') if os.path.isdir(root) else root
    if not (os.path.isfile(csv_path) and csv_path.endswith('.csv')):
        return None
    try:
        ds = clip_data.read_prompt_csv(csv_path, check_images=False)
    except Exception:   # not a prompt CSV: quality only
        return None
    return {os.path.abspath(p): (t, float(a)) for p, t, a in zip(ds.paths, ds.prompts, ds.mos_c)}


def run_checkpoint(args, device, amp, specs):
    """cross_dataset_test.py with a train_clip.py checkpoint.

    --images a CSV with image and prompt columns (or plain images): a CSV of quality and
    consistency per image (consistency empty without a prompt). Otherwise each --datasets
    entry: quality SRCC/PLCC (+ 95% intervals) on any IQA set, and consistency where the set
    has prompts and alignment scores (AGIQA-3K's data.csv). Returns the exit code."""
    import csv as csv_module
    import io
    import sys

    import data_loader
    model, ckpt = load_model(args.checkpoint, device)
    tokenizer = models_clip.build_tokenizer(model.config['clip_model'])
    scale_q, scale_c = ckpt.get('label_scales') or (1.0, 1.0)
    cache_dir = None if args.cache_dir is not None and args.cache_dir.lower() in ('none', '') else args.cache_dir
    batch = args.batch_size or 64
    print(f'CLIP checkpoint {args.checkpoint}: {model.config["clip_model"]}, epoch {ckpt.get("epoch")}, '
          f'{models_clip.count_parameters(model) / 1e6:.2f} M params, device {device}', flush=True)
    if args.images:
        if len(args.images) == 1 and args.images[0].lower().endswith('.csv'):
            header, table = data_loader._read_csv(args.images[0], ['prompt'])
            column = next((c for c in ('image', 'path', 'name') if c in header), None)
            if column is None:
                raise data_loader.DataError(f'{args.images[0]}: no image column (image, path or name)')
            base = os.path.dirname(os.path.abspath(args.images[0]))
            paths = [r[column] if os.path.isabs(r[column]) else os.path.join(base, r[column]) for _, r in table]
            prompts = [r['prompt'] for _, r in table]
        else:
            paths = [p for spec in args.images for p in (sorted(glob.glob(spec)) or [spec])]
            prompts = None
        q, c, kept = _score_paths(model, paths, prompts, tokenizer, device, amp, batch, cache_dir, args.num_workers)
        scored = dict(zip(kept.tolist(), zip(q, c)))
        buf = io.StringIO()
        writer = csv_module.writer(buf, lineterminator='\n')
        writer.writerow(['path', 'prompt', 'quality', 'consistency', 'error'])
        for i, path in enumerate(paths):
            qi, ci = scored.get(i, (None, None))
            writer.writerow([path, prompts[i] if prompts else '',
                             '' if qi is None else f'{qi * scale_q:.6f}',
                             '' if qi is None or prompts is None else f'{ci * scale_c:.6f}',
                             '' if qi is not None else 'unreadable or missing'])
        output = args.output or 'scores.csv'
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write_text(output, buf.getvalue())
        print(f'{len(kept)} of {len(paths)} images scored (quality and consistency on the training labels\' '
              f'scale: x{scale_q:g} and x{scale_c:g}); written to {output}')
        return 0 if len(kept) else 1

    results = {}
    for label, name, root in specs:
        if not root.exists():
            print(f'{label}: not found at {root}; skipped', flush=True)
            continue
        dataset = data_loader.load_dataset(name, root, seed=args.seed or 0)
        index = np.asarray(dataset.splits['test']) if args.split == 'test' else np.arange(len(dataset))
        paths = [dataset.paths[i] for i in index]
        prompt_info = _agiqa_prompts(str(root)) if name in ('agiqa-3k', data_loader.GENERIC) else None
        prompts = None
        if prompt_info is not None:
            found = [prompt_info.get(os.path.abspath(p)) for p in paths]
            prompts = [f[0] if f else '' for f in found] if all(found) else None
        q, c, kept = _score_paths(model, paths, prompts, tokenizer, device, amp, batch, cache_dir, args.num_workers)
        mos_q = dataset.mos[index[kept]] * (1.0 if dataset.higher_is_better else -1.0)
        mos_c = np.array([prompt_info[os.path.abspath(paths[i])][1] for i in kept]) if prompts else None
        r = {'dataset': dataset.name, 'images': int(len(kept)), **head_metrics(q, c, mos_q, mos_c)}
        if args.n_boot > 0:
            r['srcc_q_ci'] = list(iqa_metrics.bootstrap_ci(q, mos_q, 'srcc', n_boot=args.n_boot))
            if mos_c is not None:
                r['srcc_c_ci'] = list(iqa_metrics.bootstrap_ci(c, mos_c, 'srcc', n_boot=args.n_boot))
        results[label] = r
        print(f'{label}: {len(kept)} images, quality SRCC {r["srcc_q"]:.4f} PLCC {r["plcc_q"]:.4f}'
              + (f', consistency SRCC {r["srcc_c"]:.4f} PLCC {r["plcc_c"]:.4f}' if mos_c is not None else
                 ' (no prompts: consistency not scored)'), flush=True)
    if not results:
        print('No data set could be scored (use --datasets NAME=PATH)', file=sys.stderr)
        return 2
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    if stem == 'last':
        stem = f'{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}_last'
    path = os.path.join(args.output_dir, f'cross_dataset_results_clip_{stem}.json')
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json(path, {'checkpoint': os.path.abspath(args.checkpoint), 'system': 'clip',
                                         'model_config': model.config, 'epoch': ckpt.get('epoch'),
                                         'split': args.split, 'results': results})
    print(f'Results written to {path}')
    return 0
