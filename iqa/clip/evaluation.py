"""Scoring with a CLIP quality/consistency model, shared by train_clip.py (every epoch) and
cross_dataset_test.py (saved checkpoints), so both score an image exactly the same way.

Checkpoint format (train_clip.py writes it): {"format": "clip-iqa-checkpoint/1", "state_dict",
"model_config" (rebuilds the model offline, iqa.clip.models.build_from_config), "config" (the run's
flags), "label_scales", "epoch", "round", "metrics", ...}.
"""
import csv
import glob
import io
import math
import os
import sys

import numpy as np
import torch

from iqa.data.formats import read_csv
from iqa.data.image_cache import load_images
from iqa.data.registry import GENERIC, DataError
from iqa import metrics as iqa_metrics
from iqa import scoring
from iqa.clip import data as clip_data
from iqa.clip import hf_import
from iqa.clip import models as models_clip
from iqa.clip import weights as clip_weights
from iqa.ckpt import CLIP_FORMAT, load_checkpoint
from iqa.files import atomic_write_json, atomic_write_text
from iqa.runtime import to_device

CLIP_CHECKPOINT_FORMAT = CLIP_FORMAT


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
    prompt_index = to_device(torch.as_tensor(np.asarray(prompt_index), dtype=torch.long), device)
    # results stay on the device until the last batch: a read-back per batch would make the host
    # wait for every batch to finish before it can queue the next one
    outs = []
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, images_u8.shape[0], batch_size):
            pixels = clip_data.clip_pixels(to_device(images_u8[i:i + batch_size], device))
            img = model.encode_image(pixels)
            txt = txt_all[prompt_index[i:i + batch_size]]
            out = model.heads(img, txt)
            outs.append(torch.stack([out['q'].float(), out['c'].float(), (img * txt).sum(-1).float()]))
    model.train(was_training)
    if not outs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    q, c, cos = torch.cat(outs, dim=1).cpu().double().numpy()
    return q, c, cos


def head_metrics(q, c, mos_q, mos_c):
    """{'srcc_q', 'plcc_q', 'krcc_q', 'srcc_c', 'plcc_c', 'krcc_c'} (consistency NaN without mos_c)."""
    out = {f'{k}_q': v for k, v in iqa_metrics.correlations(q, mos_q).items()}
    if mos_c is None:
        out.update({f'{k}_c': math.nan for k in ('srcc', 'plcc', 'krcc')})
    else:
        out.update({f'{k}_c': v for k, v in iqa_metrics.correlations(c, mos_c).items()})
    return out


def is_clip_checkpoint(path):
    """True when `path` is a file train_clip.py wrote, or one the user's baseline.py wrote (both
    scored by run_checkpoint); memory-mapped: the weights are not read."""
    if not os.path.isfile(path):
        return False
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:   # baseline.py's full checkpoints hold a numpy scalar: read with its allow-list
        return clip_weights.is_baseline_file(path)
    if isinstance(obj, dict) and obj.get('format') == CLIP_CHECKPOINT_FORMAT:
        return True
    return clip_weights.is_baseline_file(path)


def add_eval_flags(group):
    """The CLIP-only flags of cross_dataset_test.py, defined here with their meaning."""
    group.add_argument('--clip_model', default=os.environ.get('CLIP_MODEL_NAME'), metavar='NAME_OR_DIR',
                       help='baseline.py checkpoints: the CLIP it was trained from (ViT-B/32, ViT-B/16, '
                            'ViT-L/14, a Hugging Face name, or a local Hugging Face folder, whose config.json '
                            'gives the head counts). The architecture is read from the weights; a name is '
                            'checked against them (default: $CLIP_MODEL_NAME, else from the weights alone)')
    group.add_argument('--eval_precision', default='fp32', choices=('fp32', 'bf16'),
                       help='CLIP checkpoints: fp32 (as the original evaluated) or bf16 autocast for the towers '
                            '(faster on CUDA; the heads stay fp32). HyperIQA checkpoints: see --no_amp '
                            '(default: fp32)')


def load_model(path, device='cpu', clip_model=None):
    """(model, checkpoint dict) from a train_clip.py checkpoint, or from a file of the user's
    baseline.py (imported: iqa.clip.weights; the dict then holds 'epoch' None and the import's
    'notes'); no download (the architecture comes from the stored model_config or the weights)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if clip_weights.is_baseline_file(path):
        model, notes = clip_weights.import_baseline_model(path, clip_model=clip_model)
        return model.to(device).eval(), {'epoch': None, 'notes': notes, 'source': 'baseline.py'}
    ckpt = load_checkpoint(path)   # the loader both trainers' files go through (prefixes stripped)
    if ckpt['format'] != CLIP_CHECKPOINT_FORMAT:
        raise ValueError(f'{path} is not a CLIP checkpoint of train_clip.py (format {CLIP_CHECKPOINT_FORMAT!r})')
    model = models_clip.build_from_config(ckpt['model_config'], pretrained=False)
    model.load_state_dict(ckpt['state_dict'])
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------- cross_dataset_test.py

def _image_size(model):
    return int(model.image_size)


def _score_paths(model, paths, prompts, tokenizer, device, amp, batch_size, cache_dir, num_workers):
    """(quality, consistency, kept indices) for image files with their prompts (None = no prompt)."""
    size = _image_size(model)
    images, kept = load_images(paths, resize_hw=(size, size), cache_dir=cache_dir,
                                           num_workers=num_workers, skip_bad=True)
    texts = [prompts[i] if prompts is not None else '' for i in kept]
    unique, index = np.unique(np.array(texts, dtype=object).astype(str), return_inverse=True)
    q, c, _ = predict(model, images, tokenizer(list(unique)), index, batch_size=batch_size, device=device, amp=amp)
    return q, c, kept


def _agiqa_prompts(root):
    """path -> (prompt, mos_align) from an AGIQA-3K data.csv in `root`, or None."""
    csv_path = os.path.join(root, 'data.csv') if os.path.isdir(root) else root
    if not (os.path.isfile(csv_path) and csv_path.endswith('.csv')):
        return None
    try:
        ds = clip_data.read_prompt_csv(csv_path, check_images=False)
    except Exception:   # not a prompt CSV: quality only
        return None
    return {os.path.abspath(p): (t, float(a)) for p, t, a in zip(ds.paths, ds.prompts, ds.mos_c)}


def run_checkpoint(args, device, specs):
    """cross_dataset_test.py with a train_clip.py checkpoint or a file of baseline.py, evaluated at
    --eval_precision (fp32 unless bf16 is asked for: the original evaluated in fp32).

    --images a CSV with image and prompt columns (or plain images): a CSV of quality and
    consistency per image; consistency is left empty for an image without a prompt (an empty
    cell of the prompt column, or plain images), since a score against the empty text measures
    nothing. Otherwise each --datasets
    entry: quality SRCC/PLCC (+ 95% intervals) on any IQA set, and consistency where the set
    has prompts and alignment scores (AGIQA-3K's data.csv). Returns the exit code."""
    amp = args.eval_precision == 'bf16'
    try:
        model, ckpt = load_model(args.checkpoint, device, clip_model=getattr(args, 'clip_model', None))
    except (hf_import.CheckpointImportError, ValueError) as err:
        print(f'cross_dataset_test.py: error: {err}', file=sys.stderr, flush=True)
        return 2
    tokenizer = model.tokenizer
    scale_q, scale_c = ckpt.get('label_scales') or (1.0, 1.0)
    cache_dir = None if args.cache_dir is not None and args.cache_dir.lower() in ('none', '') else args.cache_dir
    batch = args.batch_size or 64
    print(f'CLIP checkpoint {args.checkpoint}: {model.config["clip_model"]}, epoch {ckpt.get("epoch")}, '
          f'{models_clip.count_parameters(model) / 1e6:.2f} M params, device {device}, '
          f'{"bf16 autocast" if amp else "fp32"}', flush=True)
    for note in ckpt.get('notes') or ():
        print(f'  {ckpt.get("source")}: {note}', flush=True)
    if args.images:
        if len(args.images) == 1 and args.images[0].lower().endswith('.csv'):
            header, table = read_csv(args.images[0], ['prompt'])
            column = next((c for c in ('image', 'path', 'name') if c in header), None)
            if column is None:
                raise DataError(f'{args.images[0]}: no image column (image, path or name)')
            base = os.path.dirname(os.path.abspath(args.images[0]))
            paths = [r[column] if os.path.isabs(r[column]) else os.path.join(base, r[column]) for _, r in table]
            prompts = [r['prompt'] for _, r in table]
        else:
            paths = [p for spec in args.images for p in (sorted(glob.glob(spec)) or [spec])]
            prompts = None
        q, c, kept = _score_paths(model, paths, prompts, tokenizer, device, amp, batch, cache_dir, args.num_workers)
        scored = dict(zip(kept.tolist(), zip(q, c)))
        has_prompt = [bool(prompts and str(prompts[i]).strip()) for i in range(len(paths))]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator='\n')
        writer.writerow(['path', 'prompt', 'quality', 'consistency', 'error'])
        for i, path in enumerate(paths):
            qi, ci = scored.get(i, (None, None))
            writer.writerow([path, prompts[i] if prompts else '',
                             '' if qi is None else f'{qi * scale_q:.6f}',
                             '' if qi is None or not has_prompt[i] else f'{ci * scale_c:.6f}',
                             '' if qi is not None else 'unreadable or missing'])
        output = args.output or 'scores.csv'
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write_text(output, buf.getvalue())
        print(f'{len(kept)} of {len(paths)} images scored (quality and consistency on the training labels\' '
              f'scale: x{scale_q:g} and x{scale_c:g}); written to {output}')
        no_prompt = sum(1 for i in kept.tolist() if not has_prompt[i])
        if no_prompt:
            print(f'  {no_prompt} of them without a prompt: quality only, consistency left empty')
        return 0 if len(kept) else 1

    run = scoring.clip_run(ckpt, args.trained_on)
    results, missing, failed = scoring.score_each(specs, lambda label, name, root: _score_dataset(
        model, tokenizer, label, name, root, run, args, device, amp, batch, cache_dir))
    if not results:
        print('No data set could be scored (use --datasets NAME=PATH)', file=sys.stderr)
        scoring.report_skipped(missing, failed)
        return 2
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    if stem == 'last':
        stem = f'{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}_last'
    path = os.path.join(args.output_dir, f'cross_dataset_results_clip_{stem}.json')
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json(path, {'checkpoint': os.path.abspath(args.checkpoint), 'system': 'clip',
                                         'model_config': model.config, 'epoch': ckpt.get('epoch'),
                                         'split': args.split, 'trained_on': run.trained_on, 'results': results,
                                         'missing': missing, 'failed': failed})
    print(f'Results written to {path}')
    return scoring.report_skipped(missing, failed)


def _score_dataset(model, tokenizer, label, name, root, run, args, device, amp, batch, cache_dir):
    """Quality (and consistency, where prompts and alignment scores are known) of the images
    scoring.select_images chooses; returns the set's entry of the results JSON."""
    chosen = scoring.select_images(label, name, root, run, args.split, seed=args.seed or 0)
    chosen.announce(label)
    paths, prompts, mos_c = chosen.paths, chosen.prompts, chosen.mos_c
    if prompts is None:   # another set: prompts from an AGIQA-3K-style data.csv, when it has them
        prompt_info = _agiqa_prompts(str(root)) if name in ('agiqa-3k', GENERIC) else None
        found = [prompt_info.get(os.path.abspath(p)) for p in paths] if prompt_info is not None else []
        if found and all(found):
            prompts, mos_c = [f[0] for f in found], np.array([f[1] for f in found])
    q, c, kept = _score_paths(model, paths, prompts, tokenizer, device, amp, batch, cache_dir, args.num_workers)
    mos_q = chosen.mos[kept] * (1.0 if chosen.higher_is_better else -1.0)
    mos_c = mos_c[kept] if prompts is not None else None
    r = {'dataset': chosen.name, 'images': int(len(kept)), **head_metrics(q, c, mos_q, mos_c)}
    if args.n_boot > 0:
        r['srcc_q_ci'] = list(iqa_metrics.bootstrap_ci(q, mos_q, 'srcc', n_boot=args.n_boot))
        if mos_c is not None:
            r['srcc_c_ci'] = list(iqa_metrics.bootstrap_ci(c, mos_c, 'srcc', n_boot=args.n_boot))
    r.update(chosen.record(kept))
    print(f'{label}: {len(kept)} images, quality SRCC {r["srcc_q"]:.4f} PLCC {r["plcc_q"]:.4f}'
          + (f', consistency SRCC {r["srcc_c"]:.4f} PLCC {r["plcc_c"]:.4f}' if mos_c is not None else
             ' (no prompts: consistency not scored)'), flush=True)
    return r
