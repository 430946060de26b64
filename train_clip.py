"""Train a CLIP model that scores an AI-generated image's quality and its consistency with its prompt.

    python train_clip.py --partial_freeze --freeze_layers 18 --data_csv_path agiqa-test/data.csv
    python train_clip.py --data_csv_path demo --clip_model nano --no_pretrained   # built-in demo

The user's baseline.py, rebuilt on this toolkit's base: every flag of their card with its
default, a train / val / test split by prompt, selection on val, test reported. Reading order:
build_parser (every flag) -> main (set-up, data, rounds) -> run_round (epochs: train,
evaluate, select, save) -> train_one_epoch / clip_eval.predict. Each run writes one folder
checkpoints/<data>-clip_<time>/ (config.json, metrics.csv, training_log.csv, summary.json,
best_model_srccq_X_srccc_Y.pkl, last.pkl) and logs/<run>.log, whose last line is
"Best test SRCC_Q ... SRCC_C ...".
"""
import argparse
import csv
import datetime
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data_loader
from iqa import ckpt, runs, runtime
from iqa import metrics as iqa_metrics
from iqa.clip import data as clip_data
from iqa.clip import evaluation as clip_eval
from iqa.clip import models as models_clip
from iqa.clip import weights as clip_weights
from iqa.runtime import (SuggestingParser, average_gradients, make_optimizer, seed_everything, set_precision,
                         setup_distributed, to_device)
from iqa.schedule import lr_factor

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
HEAD_METRICS = runs.CLIP_HEAD_METRICS
METRIC_COLUMNS = list(runs.CLIP_METRIC_COLUMNS)
# the original program's training_log.csv (its s_q ... p_c were on its only held-out split: ours is val)
LOG_CSV_COLUMNS = ['epoch', 'train_loss', 'lq', 'lc', 'le', 's_q', 'p_q', 's_c', 'p_c', 'best_s_c', 'lr']
MACHINE_FLAGS = ('device', 'num_workers', 'cache_dir', 'no_amp', 'precision', 'eval_batch_size', 'pin_memory', 'no_pin_memory')


# --------------------------------------------------------------------------- flags

def build_parser():
    p = SuggestingParser(
        prog='train_clip.py', allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train a CLIP model for the quality and the text-image consistency of AI-generated '
                    'images (the user\'s baseline.py; flags as on their card).')

    g = p.add_argument_group('Data')
    g.add_argument('--data_csv_path', default=str(clip_data.DEFAULT_CSV), metavar='CSV',
                   help='AGIQA-3K data.csv (name, prompt, mos_quality, mos_align[, explanation]) or any CSV '
                        'with those columns; "demo" = the built-in demo set (no download)')
    g.add_argument('--image_base_dir', default=None, metavar='DIR',
                   help='folder of the images; None = found next to the CSV (AGIQA-3K/, images/, image/, the '
                        'CSV\'s folder, else one level below; the folder used is printed)')
    g.add_argument('--quality_column', default='mos_quality', metavar='COL', help='quality score column')
    g.add_argument('--align_column', default='mos_align', metavar='COL', help='consistency score column')
    g.add_argument('--use_explanations', action='store_true',
                   help='add the explanation-distillation loss (needs the explanation column)')
    g.add_argument('--explanation_column', default='explanation', metavar='COL', help='explanation text column')
    g.add_argument('--label_scale_q', type=float, default=None, metavar='S',
                   help='quality labels are divided by S; None = auto (5 if the column\'s max > 1.5, else 1)')
    g.add_argument('--label_scale_c', type=float, default=None, metavar='S',
                   help='consistency labels are divided by S; None = auto (as for quality)')
    g.add_argument('--val_ratio', type=float, default=0.1, metavar='R', help='share of prompts for validation')
    g.add_argument('--test_ratio', type=float, default=0.2, metavar='R', help='share of prompts for test')
    g.add_argument('--split_file', default=None, metavar='FILE',
                   help='published split: JSON {"train": [names], "val": [...], "test": [...]} or CSV name,split')
    g.add_argument('--train_test_num', type=int, default=1, metavar='N',
                   help='rounds, each with a new prompt split (seed + round - 1); the median is reported')
    g.add_argument('--cache_dir', default=os.path.join(SCRIPT_DIR, '.cache', 'images'), metavar='DIR',
                   help='decoded-image cache ("none" disables it)')
    g.add_argument('--train_image_size', type=int, default=None, metavar='PX',
                   help='side of the square image cache training crops are cut from (then resized to the model\'s '
                        'input size, as the original cut 80-100%% of the full image and downsampled); None = the '
                        'images\' median short side within [model size, 2 x model size] (448 for 224-pixel '
                        'models on AGIQA-3K; the model size for the 64-pixel demo). Evaluation always resizes '
                        'the whole image to the model size, as the original did')
    g.add_argument('--num_workers', type=int, default=4, metavar='N', help='threads decoding images for the cache')
    g.add_argument('--pin_memory', action='store_true', default=None,
                   help='pinned host memory for batches sent to the GPU (default: on with CUDA)')
    g.add_argument('--no_pin_memory', action='store_true', help='no pinned memory')

    g = p.add_argument_group('Model')
    g.add_argument('--clip_model', default=os.environ.get('CLIP_MODEL_NAME', models_clip.DEFAULT_CLIP_MODEL),
                   metavar='NAME', help='nano (tiny, tests/demo), ViT-B/32, ViT-B/16, ViT-L/14 (also the Hugging '
                                        'Face names); default: $CLIP_MODEL_NAME, else ViT-L/14')
    g.add_argument('--no_pretrained', action='store_true', help='random initialisation (no OpenAI CLIP weights)')
    g.add_argument('--pretrained_path', default=None, metavar='FILE_OR_DIR',
                   help='local weights instead of the hub (offline clusters): an open_clip weights file, or a '
                        'Hugging Face CLIPModel folder (config.json + weights) or weights file, as the original '
                        'loaded. OpenAI weights (hub or file) build QuickGELU towers, as OpenAI trained them; '
                        '--no_pretrained and nano keep GELU')
    g.add_argument('--init_from', default=None, metavar='FILE',
                   help='start a NEW run from these weights: a baseline.py file (bare best state_dict, '
                        'baseline_best.pt, baseline_last.pt) or a train_clip.py checkpoint. The architecture is '
                        'the file\'s; its optimizer state is not carried over (to continue a train_clip.py run, '
                        'use --resume_from)')
    g.add_argument('--no_residual_learning', action='store_true',
                   help='direct heads q = sigmoid(Linear(img)), c = sigmoid(MLP([img, txt, cos])) instead of '
                        'CLIP base score + bounded residual')
    g.add_argument('--residual_scale_q', type=float, default=0.2, metavar='S', help='quality residual scale s_q')
    g.add_argument('--residual_scale_c', type=float, default=0.2, metavar='S', help='consistency residual scale s_c')
    g.add_argument('--bound', default='clamp', choices=models_clip.BOUNDS,
                   help='how residual-mode scores are kept in [0, 1]: clamp (the original; no gradient at the '
                        'bounds) or smooth (identity inside [0.05, 0.95], smooth tails)')
    g.add_argument('--dropout', type=float, default=0.1, metavar='P', help='dropout in the residual heads')
    g.add_argument('--use_two_branch', action='store_true',
                   help='(with --no_residual_learning) average the MLP score with sigmoid(k * cos + b)')
    g.add_argument('--use_refinement', action='store_true',
                   help='(with --no_residual_learning) add the Transformer refinement of the consistency')
    g.add_argument('--refinement_layers', type=int, default=4, metavar='N', help='refinement Transformer layers')
    g.add_argument('--refinement_heads', type=int, default=8, metavar='N', help='refinement attention heads')
    g.add_argument('--refinement_dim', type=int, default=256, metavar='D', help='refinement hidden size')
    g.add_argument('--no_strict_residual', action='store_true',
                   help='(with --use_refinement) the card\'s switch to the plain MSE(c, target); the original\'s '
                        'strict residual loss is the same number and gradient, so both train alike')
    g.add_argument('--refinement_loss', default='strict', choices=('strict', 'two_stage'),
                   help='(with --use_refinement) consistency loss: strict = the original\'s strict residual '
                        'MSE(c - coarse.detach(), t - coarse.detach()), equal to MSE(c, t) in value and gradient; '
                        'two_stage = MSE(coarse, t) + MSE(clamp(coarse.detach() + residual), t), the coarse '
                        'score and the refinement supervised apart (not in the original)')
    g.add_argument('--freeze_clip', action='store_true', help='freeze both CLIP towers (heads only)')
    g.add_argument('--partial_freeze', action='store_true',
                   help='freeze the embeddings (patch, class, position, token) and the first --freeze_layers '
                        'blocks of each tower, as the original meant (its own code crashes on this flag)')
    g.add_argument('--freeze_layers', type=int, default=8, metavar='N',
                   help='blocks frozen by --partial_freeze (ViT-B: 12 blocks, ViT-L: 24 vision / 12 text); N at '
                        'or above a tower\'s depth freezes all its blocks')
    g.add_argument('--freeze_ln_pre', action='store_true',
                   help='(with --partial_freeze) also freeze the vision tower\'s ln_pre (not in the original; '
                        'make demo-clip uses it, as its numbers were measured so)')

    g = p.add_argument_group('Training')
    g.add_argument('--epochs', type=int, default=20, metavar='N', help='epochs per round')
    g.add_argument('--batch_size', type=int, default=32, metavar='N', help='images per step')
    g.add_argument('--eval_batch_size', type=int, default=64, metavar='N', help='images per evaluation forward')
    g.add_argument('--eval_precision', default='fp32', choices=('fp32', 'bf16'),
                   help='evaluation: fp32 (as the original evaluated) or bf16 autocast for the towers (faster on '
                        'CUDA; the heads always run in fp32)')
    g.add_argument('--lr', type=float, default=3e-5, metavar='LR', help='learning rate of the CLIP towers (AdamW)')
    g.add_argument('--head_lr_ratio', type=float, default=1.0, metavar='R',
                   help='heads learn at lr x R (1 = the original: one rate for all)')
    g.add_argument('--text_lr_ratio', type=float, default=1.0, metavar='R',
                   help='the text tower learns at lr x R (1 = as the image tower; 0 = it keeps its weights)')
    g.add_argument('--weight_decay', type=float, default=1e-4, metavar='WD', help='AdamW weight decay')
    g.add_argument('--scheduler', default='cosine', choices=('cosine', 'linear', 'constant', 'step'),
                   help='per-step cosine/linear decay or constant, after a linear warm-up; step: lr x gamma '
                        'every --step_lr_step_size epochs (no warm-up)')
    g.add_argument('--warmup_ratio', type=float, default=0.05, metavar='R', help='warm-up share of all optimizer steps')
    g.add_argument('--step_lr_step_size', type=int, default=1, metavar='N', help='StepLR period in epochs')
    g.add_argument('--step_lr_gamma', type=float, default=0.1, metavar='G', help='StepLR decay factor')
    g.add_argument('--max_grad_norm', type=float, default=1.0, metavar='X', help='gradient clipping (0 = off)')
    g.add_argument('--grad_accum_steps', type=int, default=1, metavar='N', help='batches per optimizer step')
    g.add_argument('--w_q', type=float, default=0.5, metavar='W', help='quality loss weight')
    g.add_argument('--w_c', type=float, default=0.5, metavar='W', help='consistency loss weight')
    g.add_argument('--w_exp', type=float, default=0.1, metavar='W', help='explanation loss weight (--use_explanations)')

    g = p.add_argument_group('Selection and early stopping')
    g.add_argument('--select_on', default='consistency', choices=('quality', 'consistency', 'mean'),
                   help='val SRCC that picks the best epoch and drives early stopping: consistency (the '
                        'original\'s choice), quality, or the mean of both. Consistency is the default because '
                        'a quality head that learns little on a data set has a noisy SRCC, and in the mean that '
                        'noise picks the epoch (on a held-out AIGC set it kept epoch 4, test consistency 0.65, '
                        'where later epochs reached 0.76-0.78)')
    g.add_argument('--early_stopping_patience', type=int, default=0, metavar='N',
                   help='epochs without improvement before stopping (0 = off)')
    g.add_argument('--early_stopping_min_delta', type=float, default=1e-4, metavar='D',
                   help='smallest gain of the selection SRCC that counts as an improvement')

    g = p.add_argument_group('Output and resume')
    g.add_argument('--output_dir', default=os.path.join(SCRIPT_DIR, 'checkpoints'), metavar='DIR',
                   help='parent folder of the run folders')
    g.add_argument('--log_dir', default=os.path.join(SCRIPT_DIR, 'logs'), metavar='DIR', help='folder of <run>.log')
    g.add_argument('--log_csv', default='training_log.csv', metavar='NAME',
                   help='the original\'s per-epoch CSV, written in the run folder')
    g.add_argument('--name', default='', metavar='LABEL', help='experiment label stored in config.json')
    g.add_argument('--resume_from', '--resume', dest='resume_from', default=None, metavar='RUN_DIR_OR_CKPT',
                   help='continue a run from its folder (last.pkl) or its last.pkl: model, optimizer, '
                        'schedule, RNG and logs exactly where they were')

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42, metavar='N', help='split, data order, augmentation, initialisation')
    g.add_argument('--device', default='auto', metavar='DEV', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--precision', default='auto', choices=('auto', 'bf16', 'fp32'),
                   help='auto = bf16 autocast on CUDA, fp32 on the CPU; bf16 also runs on the CPU (slow; for '
                        'checking the CUDA numerics there); fp32 has TF32 off')
    g.add_argument('--no_amp', action='store_true', help='the card\'s spelling of --precision fp32')
    return p


def check_args(args, warn):
    """Explain contradictory or out-of-range flags before any work starts; return the args."""
    errors = []
    if args.no_amp:
        if args.precision == 'bf16':
            errors.append('--no_amp means --precision fp32, which contradicts --precision bf16')
        args.precision = 'fp32'
    try:
        if not (models_clip.is_local_weights(args.clip_model) or args.init_from):   # else: read from the files
            args.clip_model = models_clip.canonical_name(args.clip_model)
    except ValueError as err:
        errors.append(f'--clip_model (or $CLIP_MODEL_NAME): {err}')
    if args.train_image_size is not None and args.train_image_size < 1:
        errors.append(f'--train_image_size must be at least 1, got {args.train_image_size}')
    for flag in ('epochs', 'batch_size', 'eval_batch_size', 'grad_accum_steps', 'train_test_num',
                 'step_lr_step_size', 'refinement_layers', 'refinement_heads', 'refinement_dim'):
        if getattr(args, flag) < 1:
            errors.append(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    for flag in ('w_q', 'w_c', 'w_exp', 'weight_decay', 'max_grad_norm', 'residual_scale_q', 'residual_scale_c',
                 'freeze_layers', 'num_workers', 'early_stopping_patience', 'early_stopping_min_delta', 'step_lr_gamma'):
        if getattr(args, flag) < 0:
            errors.append(f'--{flag} must be >= 0, got {getattr(args, flag)}')
    if args.lr <= 0 or args.head_lr_ratio <= 0:
        errors.append('--lr and --head_lr_ratio must be positive')
    if args.text_lr_ratio < 0:
        errors.append(f'--text_lr_ratio must be >= 0 (0 = the text tower keeps its weights), got {args.text_lr_ratio}')
    if args.w_q == 0 and args.w_c == 0 and not (args.use_explanations and args.w_exp > 0):
        errors.append('--w_q 0 and --w_c 0: nothing would be learned')
    if not 0 <= args.dropout < 1:
        errors.append(f'--dropout must be in [0, 1), got {args.dropout}')
    if not 0 <= args.warmup_ratio < 1:
        errors.append(f'--warmup_ratio must be in [0, 1), got {args.warmup_ratio}')
    if not (0 <= args.val_ratio < 1 and 0 < args.test_ratio < 1 and args.val_ratio + args.test_ratio < 1):
        errors.append(f'--val_ratio {args.val_ratio} / --test_ratio {args.test_ratio}: need 0 <= val, 0 < test, '
                      'val + test < 1')
    for flag in ('label_scale_q', 'label_scale_c'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            errors.append(f'--{flag} must be positive, got {getattr(args, flag)}')
    if args.refinement_heads >= 1 and args.refinement_dim % args.refinement_heads:
        errors.append(f'--refinement_dim {args.refinement_dim} must be divisible by --refinement_heads '
                      f'{args.refinement_heads}')
    if args.pin_memory and args.no_pin_memory:
        errors.append('--pin_memory and --no_pin_memory contradict each other')
    if args.no_pretrained and (args.pretrained_path or models_clip.is_local_weights(args.clip_model)):
        errors.append('--no_pretrained and --pretrained_path (or a local folder as --clip_model) contradict each other')
    if args.pretrained_path and not os.path.exists(args.pretrained_path):
        errors.append(f'--pretrained_path {args.pretrained_path}: no such file')
    if args.no_strict_residual and args.refinement_loss == 'two_stage':
        errors.append('--no_strict_residual (MSE(c, t)) and --refinement_loss two_stage contradict each other')
    if errors:
        raise SystemExit('train_clip.py: error: ' + '\n  '.join([''] + errors).lstrip('\n') + '\nNothing was run.')
    if args.freeze_ln_pre and not args.partial_freeze:
        warn('--freeze_ln_pre is used only with --partial_freeze')
    if args.freeze_clip and args.partial_freeze:
        warn('--freeze_clip freezes both towers whole; --partial_freeze has no effect')
    if not args.no_residual_learning:
        for flag in ('use_two_branch', 'use_refinement'):
            if getattr(args, flag):
                warn(f'--{flag} belongs to the direct heads (--no_residual_learning); the residual heads '
                     'used here ignore it, as the original did')
    elif args.residual_scale_q != 0.2 or args.residual_scale_c != 0.2 or args.bound != 'clamp':
        warn('--residual_scale_q/_c and --bound belong to the residual heads; --no_residual_learning ignores them')
    if args.refinement_loss != 'strict' and not (args.use_refinement and args.no_residual_learning):
        warn('--refinement_loss only changes the loss of --use_refinement with --no_residual_learning')
    if args.w_exp != 0.1 and not args.use_explanations:
        warn('--w_exp is used only with --use_explanations')
    args.pin_memory = not args.no_pin_memory if args.pin_memory is None else args.pin_memory
    return args


# --------------------------------------------------------------------------- loss

def consistency_loss(out, target, args):
    """MSE of the consistency. The original's default, strict residual, is
    MSE(c - coarse.detach(), target - coarse.detach()): the detached coarse score cancels in the
    difference, so it is MSE(c, target) in value and gradient, and that is what --use_refinement
    trains by default. --refinement_loss two_stage supervises the coarse score and the
    refinement apart: MSE(coarse, target) + MSE(clamp(coarse.detach() + residual), target)."""
    if out['residual'] is not None and args.refinement_loss == 'two_stage':
        refined = torch.clamp(out['c_coarse'].detach() + out['residual'], 0.0, 1.0)
        return F.mse_loss(out['c_coarse'], target) + F.mse_loss(refined, target)
    return F.mse_loss(out['c'], target)


# --------------------------------------------------------------------------- one epoch

def epoch_batches(data, batches, args, device):
    """Per batch of the epoch: (host image rows, device tensors the step reads).

    Everything a step needs besides its images is prepared here on the host and copied to the
    device in one transfer per epoch, so the steps themselves never wait on a host<->device copy:
    targets, prompt indices, and the prompts each batch sends through the text tower (the
    sorted unique prompts and each image's position among them, what torch.unique gives)."""
    rows, parts, layout = [], [], []
    for batch in batches:
        idx = data['train'][batch]
        rows.append(idx)
        fields = {'pidx': data['prompt_index'][idx]}
        fields['uniq'], fields['inverse'] = np.unique(fields['pidx'], return_inverse=True)
        if args.use_explanations:
            fields['eidx'] = data['explanation_index'][idx]
            fields['euniq'], fields['einverse'] = np.unique(fields['eidx'], return_inverse=True)
        layout.append({k: len(v) for k, v in fields.items()})
        parts += [np.asarray(v, dtype=np.int64).reshape(-1) for v in fields.values()]
    everything = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    # the targets as before: float64 division, then float32
    q = torch.as_tensor(data['mos_q'][everything] / data['scale_q'], dtype=torch.float32)
    c = torch.as_tensor(data['mos_c'][everything] / data['scale_c'], dtype=torch.float32)
    ints = to_device(torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), device)
    floats = to_device(torch.stack([q, c]), device)
    steps, at, start = [], 0, 0
    for idx, sizes in zip(rows, layout):
        step = {'q': floats[0, start:start + len(idx)], 'c': floats[1, start:start + len(idx)]}
        start += len(idx)
        for key, size in sizes.items():
            step[key] = ints[at:at + size]
            at += size
        steps.append((idx, step))
    return steps


def train_one_epoch(model, optimizer, data, epoch, round_seed, args, device, amp, state):
    """One pass over the training images; returns mean (loss, lq, lc, le), seconds, images/s.

    Order and augmentation come from generators seeded by (round seed, epoch), and dropout from
    the global RNG that last.pkl stores, so a resumed run repeats an uninterrupted one. A step
    reads nothing back from the device: the losses are summed there and read once per epoch."""
    model.train()
    n = len(data['train'])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(round_seed * 1000 + epoch)).numpy()
    aug = torch.Generator().manual_seed(round_seed * 1000 + epoch + 500)
    batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    rank, world = state.get('rank', 0), state.get('world', 1)
    if world > 1:   # each process takes every world-th image of a batch; a batch too small to share is left out
        batches = [batch[rank::world] for batch in batches if len(batch) >= world]
    totals = torch.zeros(4, device=device)
    start = time.perf_counter()
    prompt_ids = data['prompt_ids'].to(device)
    explanation_ids = data['explanation_ids'].to(device) if args.use_explanations else None
    steps = epoch_batches(data, batches, args, device)
    optimizer.zero_grad(set_to_none=True)
    for b, (idx, t) in enumerate(steps):
        images = data['train_images'][idx]
        if args.pin_memory and device.type == 'cuda':
            images = images.pin_memory()
        pixels = clip_data.clip_pixels(images.to(device, non_blocking=True), train=True, generator=aug,
                                       size=model.image_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            img = model.encode_image(pixels)
            if data['text_cache'] is not None:          # text tower frozen: embeddings computed once per run
                txt = data['text_cache'][t['pidx']]
            else:                                        # each prompt of the batch through the tower once
                txt = model.encode_text(prompt_ids[t['uniq']])[t['inverse']]
            out = model.heads(img, txt)
            lq = F.mse_loss(out['q'].float(), t['q'])
            lc = consistency_loss({k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}, t['c'], args)
            le = torch.zeros((), device=device)
            if args.use_explanations:
                if data['explanation_cache'] is not None:
                    target = data['explanation_cache'][t['eidx']]
                else:  # the teacher: the text tower's own embedding of the explanation, no gradient
                    with torch.no_grad():
                        target = model.encode_text(explanation_ids[t['euniq']])[t['einverse']]
                le = model.explanation_loss(out['img'].float(), out['txt'].float(), target.float())
            loss = args.w_q * lq + args.w_c * lc + (args.w_exp * le if args.use_explanations else 0.0)
        (loss / args.grad_accum_steps).backward()
        totals += torch.stack([loss.detach(), lq.detach(), lc.detach(), le.detach()]).float()
        if (b + 1) % args.grad_accum_steps == 0 or b + 1 == len(steps):
            average_gradients([p for g in optimizer.param_groups for p in g['params']], world)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']],
                                               args.max_grad_norm)
            factor = lr_factor(state['step'], epoch, state['total_steps'], args)
            for group in optimizer.param_groups:
                group['lr'] = group['initial_lr'] * factor
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state['step'] += 1
    if world > 1:
        dist.all_reduce(totals)
        totals /= world
    means = (totals / max(1, len(steps))).tolist()
    if not all(math.isfinite(v) for v in means):
        raise FloatingPointError(f'non-finite training loss in epoch {epoch + 1} ({means[0]})')
    seconds = time.perf_counter() - start
    return means, seconds, n / seconds


# --------------------------------------------------------------------------- outputs

def fmt(x, spec='.4f'):
    return '' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def original_log_values(val, previous, args, next_lr_factor):
    """The original's training_log.csv numbers of one epoch, unrounded: its s_q, p_q, s_c, p_c (on
    val here; None without a val split), best_s_c, its running best of s_c (from -1, raised only
    by a gain above --early_stopping_min_delta, as it chose its best checkpoint; per round), and
    lr, the first parameter group's rate after the epoch's last scheduler step, i.e. the rate the
    next step uses (the original printed opt.param_groups[0]['lr'] after sched.step())."""
    best = previous['best_s_c'] if previous and previous.get('best_s_c') is not None else -1.0
    values = {k: None for k in ('s_q', 'p_q', 's_c', 'p_c')}
    if val is not None:
        values.update(s_q=val['srcc_q'], p_q=val['plcc_q'], s_c=val['srcc_c'], p_c=val['plcc_c'])
        if values['s_c'] - best > args.early_stopping_min_delta:   # False for NaN, as in the original
            best = values['s_c']
    values['best_s_c'] = best if val is not None else None
    values['lr'] = args.lr * next_lr_factor
    return values


def restore_log_values(run_dir, log_csv, rows):
    """Attach to the kept metrics.csv rows of a resumed run the original's log values they were
    written with (metrics.csv rounds to 4 digits; training_log.csv keeps the original's 6 and its
    running best), so the resumed run writes the log the uninterrupted one would."""
    path = os.path.join(run_dir, log_csv)
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        logged = list(csv.DictReader(f))
    for row, old in zip(rows, logged):   # one log row per metrics row, in the same order
        row['training_log'] = {k: float(old[k]) if old.get(k) not in (None, '') else None
                               for k in ('s_q', 'p_q', 's_c', 'p_c', 'best_s_c', 'lr')}


def original_log_row(row):
    """One training_log.csv row in the original's columns and number formats."""
    def f6(key):
        return f'{float(row[key]):.6f}' if row.get(key) not in (None, '') else ''
    values = row.get('training_log') or {}   # absent from rows of runs written before it was stored
    out = {'epoch': row['epoch'], 'train_loss': f6('train_loss'), 'lq': f6('train_loss_q'), 'lc': f6('train_loss_c'),
           'le': f6('train_loss_exp'), 's_q': f6('val_srcc_q'), 'p_q': f6('val_plcc_q'), 's_c': f6('val_srcc_c'),
           'p_c': f6('val_plcc_c'), 'best_s_c': '', 'lr': f'{float(row["lr_backbone"]):.8f}'}
    for key in ('s_q', 'p_q', 's_c', 'p_c', 'best_s_c'):
        if key in values:
            out[key] = fmt(values[key], '.6f')
    if values.get('lr') is not None:
        out['lr'] = f'{values["lr"]:.8f}'
    return out


def write_logs(run_dir, args, rows):
    # metrics.csv holds numbers only; the original's log values ride in the row for training_log.csv
    runs.write_metrics(run_dir, [{k: v for k, v in row.items() if k != 'training_log'} for row in rows])
    runs.write_metrics(run_dir, [original_log_row(row) for row in rows], args.log_csv)


def selection_score(metrics, select_on):
    if select_on == 'quality':
        return metrics['srcc_q']
    if select_on == 'consistency':
        return metrics['srcc_c']
    return 0.5 * (metrics['srcc_q'] + metrics['srcc_c'])


# --------------------------------------------------------------------------- one round

def build_model(args, log=None):
    if args.init_from:   # the file's architecture; flags that disagree are set to it and named
        model, notes = clip_weights.init_model(args.init_from, args)
        for note in notes if log else ():
            log(note)
        return model
    return models_clip.ClipQualityModel(
        args.clip_model, pretrained=not args.no_pretrained, pretrained_path=args.pretrained_path,
        residual=not args.no_residual_learning, residual_scale_q=args.residual_scale_q,
        residual_scale_c=args.residual_scale_c, dropout=args.dropout, use_two_branch=args.use_two_branch,
        use_refinement=args.use_refinement, refinement_layers=args.refinement_layers,
        refinement_heads=args.refinement_heads, refinement_dim=args.refinement_dim, bound=args.bound)


def run_round(round_idx, args, state, ctx):
    """Train and evaluate one round; returns this round's best-epoch record and a status."""
    log, device, amp, data = ctx['log'], ctx['device'], ctx['amp'], ctx['data']
    round_seed = args.seed + round_idx - 1
    ds = data['dataset']
    # the one split rule cross_dataset_test.py redraws from a checkpoint (clip_data.draw_split)
    splits, source = clip_data.draw_split(ds, round_seed, args.val_ratio, args.test_ratio, args.split_file)
    shared = clip_data.shared_prompts(splits, ds.prompts) if args.split_file else []
    if shared:
        log(f'WARNING: {len(shared)} prompts of --split_file sit on more than one side (e.g. {shared[0]!r}); '
            'consistency results then partly measure memorised prompts')
    select_split = 'val' if 'val' in splits else 'test'
    no_val = None
    if select_split == 'test':
        no_val = f'none in --split_file {args.split_file}' if args.split_file else '--val_ratio 0'
        log(f'note: no validation split ({no_val}); the best epoch is selected on the TEST split and results '
            f'are labelled "selected on test (no validation split: {no_val})"')
    n_prompts = {k: len({ds.prompts[i] for i in v}) for k, v in splits.items()}
    log(f'Round {round_idx}/{args.train_test_num}: split {source}: ' + ', '.join(
        f'{k} {len(v)} images / {n_prompts[k]} prompts' for k, v in splits.items()))
    ctx['open_run']()   # the data check passed: now the run gets its folder and log
    run_dir = ctx['run_dir']
    data['train'] = splits['train']

    model = ctx.pop('model', None)   # the first round's model is built before the data (see main)
    if model is None:
        seed_everything(round_seed)
        model = build_model(args)
    freeze_text = model.freeze(args.freeze_clip, args.partial_freeze, args.freeze_layers, args.freeze_ln_pre,
                               warn=lambda m: log(f'note: {m}'))
    model = model.to(device)
    runtime.seed_rank(round_seed, state.get('rank', 0))   # after the model: identical on every rank
    log(f'  {freeze_text}; parameters: {models_clip.count_parameters(model):,} total, '
        f'{models_clip.count_parameters(model, trainable_only=True):,} trainable')
    state['params'] = models_clip.count_parameters(model)
    state['trainable_params'] = models_clip.count_parameters(model, trainable_only=True)
    backbone = model.backbone_parameters()
    text = []
    if args.text_lr_ratio != 1:
        # A third group, after the two every run has (lr_backbone / lr_head in metrics.csv stay
        # the image tower's and the heads'): why, see "The CLIP demo" in docs/clip.md.
        text_ids = {id(p) for n, p in model.clip.named_parameters() if not n.startswith('visual.')}
        text = [p for p in backbone if id(p) in text_ids]
        backbone = [p for p in backbone if id(p) not in text_ids]
        if args.text_lr_ratio == 0:   # kept as it is: frozen, so its embeddings are computed once
            for p in text:
                p.requires_grad_(False)
            text = []
    groups = [{'params': backbone, 'lr': args.lr, 'initial_lr': args.lr},
              {'params': model.head_parameters(), 'lr': args.lr * args.head_lr_ratio,
               'initial_lr': args.lr * args.head_lr_ratio}]
    if text:
        groups.append({'params': text, 'lr': args.lr * args.text_lr_ratio, 'initial_lr': args.lr * args.text_lr_ratio})
    optimizer = make_optimizer(groups, args, device)
    text_frozen = not any(p.requires_grad for n, p in model.clip.named_parameters() if not n.startswith('visual.'))
    data['text_cache'] = data['explanation_cache'] = None
    if text_frozen:
        data['text_cache'] = clip_eval.encode_texts(model, data['prompt_ids'], device, amp=amp)
        if args.use_explanations:
            data['explanation_cache'] = clip_eval.encode_texts(model, data['explanation_ids'], device, amp=amp)

    batches = math.ceil(len(splits['train']) / args.batch_size)
    state['total_steps'] = max(1, math.ceil(batches / args.grad_accum_steps) * args.epochs)
    state['step'] = 0
    first_epoch, best, bad_epochs = 0, None, 0
    resume = state.pop('resume_checkpoint', None)
    if resume is not None and resume['round'] == round_idx:
        first_epoch, best, bad_epochs = ckpt.restore_training_state(resume, model, optimizer, state.get('rank', 0))
        state['step'] = resume['step']
        log(f'Resumed round {round_idx} after epoch {first_epoch}')

    ckpt_dir = run_dir if args.train_test_num == 1 else os.path.join(run_dir, f'round{round_idx}')
    rank = state.get('rank', 0)
    saver = ckpt.CheckpointSaver(ckpt_dir, keep=1, warn=lambda m: log(f'WARNING: {m}'), fmt=ckpt.CLIP_FORMAT,
                                 best_name=ckpt.CLIP_BEST) if rank == 0 else None
    eval_sets = {k: splits[k] for k in ('val', 'test') if k in splits}
    log('Epoch\tLoss (q, c, exp)\t\t\tval SRCC q / c\t\ttest SRCC q / c')
    status = 'finished'
    for epoch in range(first_epoch, args.epochs):
        try:
            (loss, lq, lc, le), seconds, images_per_s = train_one_epoch(
                model, optimizer, data, epoch, round_seed, args, device, amp, state)
        except FloatingPointError as err:
            log(f'STOPPED: {err}. The model diverged (try a lower --lr or --max_grad_norm); the checkpoints '
                f'in {run_dir} are intact.')
            return best, 'diverged'
        lrs = [g['lr'] for g in optimizer.param_groups]
        row = runs.new_row(METRIC_COLUMNS)
        row.update({'round': round_idx, 'epoch': epoch + 1, 'lr_backbone': f'{lrs[0]:.3e}',
                    'lr_head': f'{lrs[1]:.3e}', 'train_loss': fmt(loss, '.6f'), 'train_loss_q': fmt(lq, '.6f'),
                    'train_loss_c': fmt(lc, '.6f'), 'train_loss_exp': fmt(le, '.6f'),
                    'epoch_seconds': f'{seconds:.1f}', 'train_images_per_s': f'{images_per_s:.1f}'})
        if not args.no_residual_learning:
            row['c_base_alpha'] = fmt(model.c_base_scale.item())
            row['c_base_beta'] = fmt(model.c_base_bias.item())
        results = {}
        for name, idx in eval_sets.items():
            q, c, _ = clip_eval.predict(model, data['images'][idx], data['prompt_ids'], data['prompt_index'][idx],
                                        batch_size=args.eval_batch_size, device=device,
                                        amp=args.eval_precision == 'bf16')
            results[name] = clip_eval.head_metrics(q, c, ds.mos_q[idx], ds.mos_c[idx])
            for m in HEAD_METRICS:
                row[f'{name}_{m}'] = fmt(results[name][m])
        score = selection_score(results[select_split], args.select_on)
        previous = -math.inf if best is None or best['select_srcc'] is None else best['select_srcc']
        improved = best is None or (not math.isnan(score) and score > previous + args.early_stopping_min_delta)
        if improved:
            bad_epochs = 0
            best = {'epoch': epoch + 1, 'select_srcc': None if math.isnan(score) else score, 'select_split': select_split,
                    **{f'val_{m}': results.get('val', {}).get(m) for m in HEAD_METRICS},
                    **{f'test_{m}': results['test'][m] for m in HEAD_METRICS}}
        else:
            bad_epochs += 1
        row['is_best'] = int(improved)
        previous_row = state['rows'][-1] if state['rows'] and state['rows'][-1]['round'] == round_idx else None
        row['training_log'] = original_log_values(
            results.get('val'), previous_row and previous_row.get('training_log'), args,
            lr_factor(state['step'], epoch + 1, state['total_steps'], args))
        state['rows'].append(row)
        val = results.get('val', results['test'])
        log(f'{epoch + 1}\t{loss:.4f} ({lq:.4f}, {lc:.4f}, {le:.4f})\t{val["srcc_q"]:.4f} / {val["srcc_c"]:.4f}\t\t'
            f'{results["test"]["srcc_q"]:.4f} / {results["test"]["srcc_c"]:.4f}\t({seconds:.0f} s, '
            f'{images_per_s:.0f} img/s, lr {lrs[0]:.2e}/{lrs[1]:.2e})' + ('  * best' if improved else ''))

        stop_now = bool(args.early_stopping_patience and bad_epochs >= args.early_stopping_patience)
        rng_state = ckpt.gather_rng_states(state.get('world', 1))   # every rank's, for --resume
        if rank == 0:   # every process holds the same model and the same evaluation; one writes
            checkpoint = {'state_dict': model.state_dict(), 'model_config': model.model_config(),
                          'config': ctx['config'], 'label_scales': [data['scale_q'], data['scale_c']],
                          'epoch': epoch + 1, 'round': round_idx, 'metrics': row,
                          'code_version': ctx['config']['code_version']}
            ckpt.save_epoch(saver, checkpoint, best=best, improved=improved, name_keys=('test_srcc_q', 'test_srcc_c'),
                            selection=f'val {args.select_on} SRCC {score:.4f}', log=log, optimizer=optimizer,
                            bad_epochs=bad_epochs, state=state, round_complete=stop_now or epoch + 1 == args.epochs,
                            step=state['step'], rng_state=rng_state)
            write_logs(run_dir, args, state['rows'])
            write_summary(run_dir, args, state, best, select_split, 'running')
        if stop_now:
            log(f'Early stopping: no val {args.select_on} SRCC gain > {args.early_stopping_min_delta} for '
                f'{bad_epochs} epochs.')
            status = 'stopped_early'
            break
    best['select_split'] = select_split
    best['no_val'] = no_val
    if best.get('checkpoint') and os.path.exists(best['checkpoint']):
        # bootstrap 95% intervals of the selected epoch's test SRCCs, from its saved weights
        model.load_state_dict(ckpt.load_checkpoint(best['checkpoint'])['state_dict'])
        idx = splits['test']
        q, c, _ = clip_eval.predict(model, data['images'][idx], data['prompt_ids'], data['prompt_index'][idx],
                                    batch_size=args.eval_batch_size, device=device, amp=args.eval_precision == 'bf16')
        best['test_srcc_q_ci'] = list(iqa_metrics.bootstrap_ci(q, ds.mos_q[idx], 'srcc'))
        best['test_srcc_c_ci'] = list(iqa_metrics.bootstrap_ci(c, ds.mos_c[idx], 'srcc'))
    return best, status


def write_summary(run_dir, args, state, best, select_split, status):
    runs.write_summary(
        run_dir, {'run_name': state['run_name'], 'name': args.name, 'system': 'clip', 'select_on': args.select_on,
                  'select_split': select_split},
        state, best, status, median_of=('srcc_q', 'plcc_q', 'srcc_c', 'plcc_c'),
        tail={'label_scales': {'quality': state['scale_q'], 'consistency': state['scale_c']},
              'params': state.get('params'), 'trainable_params': state.get('trainable_params')})


# --------------------------------------------------------------------------- main

def resolve_resume(path):
    """The checkpoint to resume from (RUN_DIR/last.pkl or the file given), loaded."""
    ckpt_path = runs.find_resume_file(path, '--resume_from')
    clip_weights.refuse_foreign_resume(ckpt_path)
    checkpoint = ckpt.load_checkpoint(ckpt_path)
    if checkpoint['format'] != ckpt.CLIP_FORMAT or checkpoint['optimizer'] is None:
        raise SystemExit(f'--resume_from {ckpt_path}: not a train_clip.py last.pkl with training state '
                         '(resume from the run folder or its last.pkl)')
    if checkpoint['round_complete'] is None:   # a file from before round_complete: derive it
        config, bad = checkpoint['config'], checkpoint['early_stopping']['bad_epochs']
        patience = config.get('early_stopping_patience')
        checkpoint['round_complete'] = bool(checkpoint['epoch'] >= config['epochs'] or (patience and bad >= patience))
    return ckpt_path, checkpoint


def load_data(args, log, model):
    """The CSV, every image decoded once (cache) at the model's input size, prompts and
    explanations tokenised once with its tokenizer."""
    csv_path = args.data_csv_path
    if csv_path == 'demo':
        csv_path = str(clip_data.ensure_clip_demo())
    ds = clip_data.read_prompt_csv(csv_path, args.image_base_dir, quality_column=args.quality_column,
                                   align_column=args.align_column,
                                   explanation_column=args.explanation_column if args.use_explanations else None)
    size = model.image_size
    images, kept = data_loader.load_images(ds.paths, resize_hw=(size, size), cache_dir=args.cache_dir,
                                           num_workers=args.num_workers)
    train_size = args.train_image_size or clip_data.train_cache_size(size, ds.paths)
    train_images = images   # crops cut from a larger cache are downsampled to the model size
    if train_size != size:
        train_images, _ = data_loader.load_images(ds.paths, resize_hw=(train_size, train_size),
                                                  cache_dir=args.cache_dir, num_workers=args.num_workers)
    tokenizer = model.tokenizer
    prompts, prompt_index = np.unique(np.array(ds.prompts, dtype=object).astype(str), return_inverse=True)
    data = {'dataset': ds, 'images': images, 'train_images': train_images, 'prompt_ids': tokenizer(list(prompts)),
            'prompt_index': prompt_index,
            'mos_q': ds.mos_q, 'mos_c': ds.mos_c,
            'scale_q': args.label_scale_q or clip_data.label_scale(ds.mos_q),
            'scale_c': args.label_scale_c or clip_data.label_scale(ds.mos_c)}
    if args.use_explanations:
        texts, data['explanation_index'] = np.unique(np.array(ds.explanations, dtype=object).astype(str),
                                                     return_inverse=True)
        data['explanation_ids'] = tokenizer(list(texts))
    log(f'Data: {len(ds)} images, {len(prompts)} prompts from {ds.csv_path}; images {size}x{size} '
        f'(training crops from {train_size}x{train_size}); '
        f'label scales quality {data["scale_q"]:g}, consistency {data["scale_c"]:g}')
    return data


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resume = None
    ignored = []
    if args.resume_from:
        resume_path, resume = resolve_resume(args.resume_from)
        ignored = runs.resume_args(args, parser, dict(resume['config']), MACHINE_FLAGS, 'resume_from')
        args.resume_from = resume_path
    warnings = []
    args = check_args(args, warnings.append)

    rank, world, device = setup_distributed(args.device)   # torchrun: one process per device
    runtime.warn_idle_gpus(device, world, warnings.append)
    amp = set_precision(args.precision, device)   # bf16 autocast needs no GradScaler (that is fp16's)
    if args.cache_dir in ('none', ''):
        args.cache_dir = None

    if resume is not None:
        run_dir, run_name = runs.resumed_run(resume_path, args.train_test_num)
    else:
        label = 'demo' if args.data_csv_path == 'demo' else (
            os.path.basename(os.path.dirname(os.path.abspath(args.data_csv_path))) or 'data')
        run_name = f'{label}-clip_{datetime.datetime.now():%Y%m%d_%H%M%S}'
        run_dir = None   # created by open_run once the data check passed
    console = runtime.capture_console() if rank == 0 else None

    log = runtime.rank_log(rank)
    try:
        runtime.log_warnings(log, warnings, ignored)
        config = dict(vars(args))
        config.update(run_name=run_name, system='clip', code_version=runs.code_version(),
                      command='python train_clip.py ' + ' '.join(argv), world_size=world,
                      **clip_data.split_paths(args))
        if resume is not None:
            config.update({k: resume['config'][k] for k in ('code_version', 'command', *clip_data.SPLIT_PATH_KEYS)
                           if k in resume['config']})
        log('=' * 72)
        log(f'Run {run_name}  ({"resumed" if resume else "new"}, device {device}, precision {"bf16 autocast" if amp else "fp32"})')
        for key in sorted(vars(args)):
            log(f'  {key:<26} {getattr(args, key)}')
        log('=' * 72)
        # The model first: a missing pretrained model must stop the run before minutes of image decoding.
        state = {'run_name': run_name, 'rows': [], 'rounds': [], 'start_time': time.time(), 'seconds_before': 0.0,
                 'rank': rank, 'world': world}
        first_round = 1
        if resume is not None:
            first_round = runs.resume_rounds(resume, state, log)
            state['rows'] = runs.read_metrics(run_dir, (resume['round'], resume['epoch']))
            restore_log_values(run_dir, args.log_csv, state['rows'])
        seed_everything(args.seed + first_round - 1)
        first_model = build_model(args, log)
        if args.init_from:   # the weights may have set model flags: config.json describes what trains
            config.update(vars(args))
        data = load_data(args, log, first_model)
        state.update(scale_q=data['scale_q'], scale_c=data['scale_c'])
        ctx = {'log': log, 'device': device, 'amp': amp, 'run_dir': None, 'config': config, 'data': data,
               'model': first_model}

        def open_run():
            if ctx['run_dir'] is None:
                ctx['run_dir'], name = runtime.open_run(args.output_dir, args.log_dir, run_name, run_dir, rank, world)
                config['run_name'] = state['run_name'] = name
                if rank == 0:
                    runs.write_config(ctx['run_dir'], config)
        ctx['open_run'] = open_run
        # the run's status is its last round's: a resumed, already ended last round keeps its own
        status = 'stopped_early' if resume is not None and resume['epoch'] < args.epochs else 'finished'
        best = None
        for round_idx in range(first_round, args.train_test_num + 1):
            best, status = run_round(round_idx, args, state, ctx)
            if status == 'diverged':
                break
            state['rounds'].append(best)
        open_run()   # a resumed run whose rounds had all ended ran none
        run_dir = ctx['run_dir']
        if rank != 0:   # the files and the result line are rank 0's
            return 3 if status == 'diverged' else 0
        write_logs(run_dir, args, state['rows'])
        if status == 'diverged':
            write_summary(run_dir, args, state, best, 'val', 'diverged')
            return 3
        best = best or state['rounds'][-1]
        write_summary(run_dir, args, state, best, best['select_split'], status)
        finished = [r for r in state['rounds'] if r]
        res = {m: float(np.median([r[f'test_{m}'] for r in finished])) for m in ('srcc_q', 'plcc_q', 'srcc_c', 'plcc_c')}
        how = f'selected on {best["select_split"]} {args.select_on}' + (
            f' (no validation split: {best["no_val"]})' if best.get('no_val') else '') + (
            f', median of {len(finished)} rounds' if len(finished) > 1 else f', epoch {best["epoch"]}')
        ci = ''
        if best.get('test_srcc_q_ci') and len(finished) == 1:
            ci = ' (95%% CI SRCC_Q %.4f-%.4f, SRCC_C %.4f-%.4f)' % (*best['test_srcc_q_ci'], *best['test_srcc_c_ci'])
        log(f'Run folder: {run_dir}')
        log('Best test SRCC_Q %.4f PLCC_Q %.4f SRCC_C %.4f PLCC_C %.4f (%s)%s' % (
            res['srcc_q'], res['plcc_q'], res['srcc_c'], res['plcc_c'], how, ci))
        return 0
    except (data_loader.DataError, models_clip.PretrainedWeightsError) as err:
        runtime.stop_run(err, log)
    finally:
        runtime.end_run(console, world)


if __name__ == '__main__':
    sys.exit(main())
