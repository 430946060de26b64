"""Train and evaluate a Swin-Transformer HyperIQA model: the whole loop in one file.

    python train_swin.py --dataset koniq-10k --model_size base --attention_fusion ...
    torchrun --nproc_per_node 2 train_swin.py ...        # DistributedDataParallel

Reading order: build_parser (every flag, grouped, defaults in the help) ->
main (set-up, rounds) -> run_round (epochs: train, evaluate, select, save) ->
train_one_epoch / evaluation.predict_scores. Losses and the learning-rate schedule are the
small functions in between. Every run writes one folder
checkpoints/<dataset>-swin[-ranking-alphaA]_<time>/ (config.json, metrics.csv,
summary.json, best_model_srcc_X_plcc_Y.pkl, last.pkl) and logs/<run>.log.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import data_loader
import models_swin
from iqa import ckpt, runs, runtime
from iqa import metrics as iqa_metrics
from iqa.data import placement
from iqa.evaluation import predict_scores, too_small_message
from iqa.engine import (CHECK_EVERY, TRAIN_DEFAULTS, check_losses, compile_model, measure_step_bytes,  # noqa: F401 (tests)
                        train_one_epoch)
from iqa.losses import LOSS_TYPES, margin_ranking_loss, quality_loss, rank_loss, total_loss  # noqa: F401 (tests)
from iqa.runtime import SuggestingParser, make_optimizer, seed_everything, set_precision, setup_distributed
from iqa.schedule import learning_rates

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
METRIC_COLUMNS = runs.swin_metric_columns()   # with the default --cross_test spaq
# Flags that describe the machine, not the experiment: a resumed run may change them.
MACHINE_FLAGS = ('device', 'num_workers', 'cache_dir', 'data_root', 'no_amp', 'precision', 'compile',
                 'eval_batch_size', 'images_on')


# --------------------------------------------------------------------------- flags

def build_parser():
    p = SuggestingParser(
        prog='train_swin.py', allow_abbrev=False,
        description='Train a Swin-Transformer HyperIQA blind image-quality model.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group('Dataset')
    g.add_argument('--dataset', default='koniq-10k', metavar='NAME',
                   help='koniq-10k, spaq, kadid-10k, agiqa-3k, livec, live, csiq, tid2013, bid, demo '
                        '(built-in, no download), or a path to a CSV/JSON list of images and scores')
    g.add_argument('--data_root', default=None, metavar='PATH',
                   help='dataset folder; None = the dataset\'s folder next to this script, e.g. koniq-10k/')
    g.add_argument('--score', default=None, metavar='COLUMN',
                   help='score column where a dataset has several (KonIQ: MOS_zscore or MOS; '
                        'AGIQA-3K: mos_quality or mos_align); None = the dataset\'s standard target')
    g.add_argument('--csv_image_column', default='image', metavar='COL', help='image column of a generic CSV')
    g.add_argument('--csv_score_column', default='score', metavar='COL', help='score column of a generic CSV')
    g.add_argument('--resize', type=int, nargs=2, default=[512, 384], metavar=('H', 'W'),
                   help='every image is resized once to H x W (the user\'s torchvision Resize((512, 384)))')
    g.add_argument('--cache_dir', default=os.path.join(SCRIPT_DIR, '.cache', 'images'), metavar='DIR',
                   help='decoded-image cache ("none" disables it)')
    g.add_argument('--skip_bad_images', action='store_true',
                   help='skip unreadable/missing/too-small images with a warning instead of stopping')
    g.add_argument('--cross_test', nargs='+', default=['spaq'], metavar='NAME',
                   help='data sets scored after each epoch, each when its folder (e.g. spaq-test/) exists; '
                        'metrics.csv gets NAME_srcc and NAME_plcc for each')
    g.add_argument('--no_spaq', action='store_true',
                   help='do not score spaq after each epoch (its metrics.csv columns stay, empty)')

    g = p.add_argument_group('Model')
    g.add_argument('--model_size', default=TRAIN_DEFAULTS['model_size'], choices=models_swin.MODEL_SIZES,
                   help='Swin size (nano = tiny random model for CPU tests/demo; resnet50 = original HyperIQA)')
    g.add_argument('--attention_fusion', action='store_true',
                   help='weight the four multi-scale stages with a learned attention net')
    g.add_argument('--no_multiscale', action='store_true', help='feed only stage 4 to the hyper-network')
    g.add_argument('--drop_path_rate', type=float, default=0.2, metavar='P', help='stochastic depth of the backbone')
    g.add_argument('--dropout_rate', type=float, default=0.3, metavar='P',
                   help='dropout on the hyper features and in the target net (Swin sizes; resnet50 is the '
                        'original HyperIQA and has none)')
    g.add_argument('--no_pretrained', action='store_true', help='random initialisation (no ImageNet weights)')
    g.add_argument('--pretrained_path', default=None, metavar='FILE',
                   help='ImageNet weights from a local file instead of the hub (offline clusters)')

    g = p.add_argument_group('Training')
    g.add_argument('--epochs', type=int, default=TRAIN_DEFAULTS['epochs'], metavar='N', help='epochs per round')
    g.add_argument('--batch_size', type=int, default=TRAIN_DEFAULTS['batch_size'], metavar='N',
                   help='training patches per step (per process)')
    g.add_argument('--eval_batch_size', type=int, default=TRAIN_DEFAULTS['eval_batch_size'], metavar='N',
                   help='patches per evaluation forward')
    g.add_argument('--train_patch_num', type=int, default=20, metavar='N',
                   help='random crops per training image per epoch')
    g.add_argument('--test_patch_num', type=int, default=20, metavar='N',
                   help='crops per evaluated image (scores averaged)')
    g.add_argument('--patch_size', type=int, default=TRAIN_DEFAULTS['patch_size'], metavar='PX', help='crop size')
    g.add_argument('--train_test_num', type=int, default=1, metavar='N',
                   help='rounds (new random split each round where there is no official split); the median is reported')
    g.add_argument('--no_color_jitter', action='store_true',
                   help='turn off ColorJitter(0.1, 0.1, 0.1, 0.05) on training crops')
    g.add_argument('--grad_accum_steps', type=int, default=TRAIN_DEFAULTS['grad_accum_steps'], metavar='N',
                   help='batches per optimizer step')
    g.add_argument('--max_grad_norm', type=float, default=TRAIN_DEFAULTS['max_grad_norm'], metavar='X',
                   help='gradient clipping (0 = off)')

    g = p.add_argument_group('Optimizer and learning-rate schedule')
    g.add_argument('--lr', type=float, default=TRAIN_DEFAULTS['lr'], metavar='LR',
                   help='backbone learning rate (AdamW)')
    g.add_argument('--lr_ratio', type=float, default=TRAIN_DEFAULTS['lr_ratio'], metavar='R',
                   help='head learning rate = lr x R')
    g.add_argument('--weight_decay', type=float, default=TRAIN_DEFAULTS['weight_decay'], metavar='WD',
                   help='AdamW weight decay')
    g.add_argument('--lr_scheduler', default=TRAIN_DEFAULTS['lr_scheduler'], choices=('cosine', 'step', 'none'),
                   help='cosine: per-epoch decay of each group to min_lr_ratio x its start; '
                        'step: head lr / 10 every 6 epochs (original HyperIQA); none: constant')
    g.add_argument('--no_lr_scheduler', action='store_true', help='same as --lr_scheduler none')
    g.add_argument('--min_lr_ratio', type=float, default=TRAIN_DEFAULTS['min_lr_ratio'], metavar='R',
                   help='cosine floor as a fraction of each group\'s starting lr')
    g.add_argument('--warmup_epochs', type=int, default=TRAIN_DEFAULTS['warmup_epochs'], metavar='N',
                   help='linear warm-up epochs')

    g = p.add_argument_group('Loss')
    g.add_argument('--loss_type', default=TRAIN_DEFAULTS['loss_type'], choices=LOSS_TYPES,
                   help='l1/l2 on MOS; srcc = 1 - batch Pearson correlation; rank and pairwise = the user\'s '
                        'pairwise rank and fidelity losses; hinge = margin ranking loss; fidelity = Thurstone '
                        'fidelity loss (formulas: docs/training.md, Losses)')
    g.add_argument('--ranking_loss_alpha', type=float, default=TRAIN_DEFAULTS['ranking_loss_alpha'], metavar='A',
                   help='weight of the margin ranking loss added to the main loss (0 = off)')
    g.add_argument('--ranking_loss_margin', type=float, default=TRAIN_DEFAULTS['ranking_loss_margin'], metavar='M',
                   help='margin of the ranking losses')

    g = p.add_argument_group('Evaluation, selection and early stopping')
    g.add_argument('--test_crop', default='fixed', choices=data_loader.EVAL_CROPS,
                   help='crops of evaluated images: fixed = --test_patch_num spread-out positions, the same at '
                        'every evaluation; random = new random positions every epoch (the user\'s paper '
                        'protocol); center = the centre crop (the user\'s default, torchvision CenterCrop). '
                        'Recorded in config.json, summary.json and each checkpoint')
    g.add_argument('--test_random_crop', action='store_true',
                   help='same as --test_crop random (the user\'s spelling)')
    g.add_argument('--select_on', default='val', choices=('val', 'test'),
                   help='split that picks the best epoch and drives early stopping '
                        '(test = the user\'s protocol; results are labelled as such)')
    g.add_argument('--val_ratio', type=float, default=data_loader.DEFAULT_VAL_RATIO, metavar='R',
                   help='where a data set has no official validation split: this share of its training '
                        'side (whole reference images / prompts where images share content, seeded like '
                        'the split) is held out as val; 0 = none, the best epoch is then selected on test '
                        f'and labelled so (default {data_loader.DEFAULT_VAL_RATIO})')
    g.add_argument('--patience', type=int, default=5, metavar='N', help='epochs without improvement before stopping')
    g.add_argument('--no_early_stopping', action='store_true', help='always run every epoch')
    g.add_argument('--early_stopping_min_delta', type=float, default=0.0, metavar='D',
                   help='smallest SRCC gain that counts as an improvement')

    g = p.add_argument_group('Output and resume')
    g.add_argument('--output_dir', default=os.path.join(SCRIPT_DIR, 'checkpoints'), metavar='DIR',
                   help='parent folder of the run folders')
    g.add_argument('--log_dir', default=os.path.join(SCRIPT_DIR, 'logs'), metavar='DIR', help='folder of <run>.log')
    g.add_argument('--name', default='', metavar='LABEL', help='experiment label stored in config.json (tables, plots)')
    g.add_argument('--keep_checkpoints', type=int, default=1, metavar='N', help='best checkpoints kept (plus last.pkl)')
    g.add_argument('--resume', default=None, metavar='RUN_DIR_OR_CKPT',
                   help='continue a run from its folder (last.pkl) or a checkpoint with training state')

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42, metavar='N', help='fixes data order, crops and initialisation')
    g.add_argument('--device', default='auto', metavar='DEV', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--num_workers', type=int, default=None, metavar='N',
                   help='threads decoding images for the cache; None = all cores')
    g.add_argument('--precision', default='auto', choices=('auto', 'bf16', 'fp32'),
                   help='bf16: bf16 autocast for the backbone (the target net stays fp32); fp32: true fp32, '
                        'TF32 off (the original code\'s numerics); auto: bf16 on CUDA, fp32 on the CPU')
    g.add_argument('--no_amp', action='store_true', help='same as --precision fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (static shapes)')
    g.add_argument('--images_on', default='auto', choices=('auto', 'gpu', 'cpu'),
                   help='where the decoded image sets live on a CUDA run: auto = on the GPU as far as a plan '
                        'made after measuring one training step allows (printed), the rest in host memory')
    return p


def check_args(args, warn):
    """Explain contradictory flags before any work starts; return the fixed-up args."""
    errors = []
    if args.no_lr_scheduler:
        args.lr_scheduler = 'none'
    if args.test_random_crop:
        if args.test_crop == 'center':
            errors.append('--test_random_crop (= --test_crop random) contradicts --test_crop center')
        args.test_crop = 'random'
    # kept in step so that readers of config.json that know only the user's flag read it right
    args.test_random_crop = args.test_crop == 'random'
    if args.no_amp:
        if args.precision == 'bf16':
            errors.append('--no_amp means --precision fp32, which contradicts --precision bf16')
        args.precision = 'fp32'
    if args.attention_fusion and args.no_multiscale:
        warn('--attention_fusion needs the multi-scale features, which --no_multiscale turns off: '
             'attention fusion is OFF for this run (single-scale model).')
        args.attention_fusion = False
    if args.compile and args.eval_batch_size != args.batch_size:
        warn(f'--compile: evaluation runs in batches of --batch_size {args.batch_size} (not --eval_batch_size '
             f'{args.eval_batch_size}), so the compiled model sees one batch shape and compiles once per mode.')
        args.eval_batch_size = args.batch_size
    if args.patch_size > min(args.resize):
        errors.append(f'--patch_size {args.patch_size} is larger than the resized image '
                      f'{args.resize[0]}x{args.resize[1]} (--resize): no crop fits')
    if args.model_size != 'resnet50' and args.patch_size != 224:
        errors.append(f'--patch_size {args.patch_size}: Swin models take 224x224 crops '
                      '(their window and LDA pooling sizes are fixed)')
    for flag in ('epochs', 'batch_size', 'eval_batch_size', 'train_patch_num', 'test_patch_num',
                 'train_test_num', 'grad_accum_steps', 'keep_checkpoints'):
        if getattr(args, flag) < 1:
            errors.append(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    for flag in ('drop_path_rate', 'dropout_rate'):
        if not 0 <= getattr(args, flag) < 1:
            errors.append(f'--{flag} must be in [0, 1), got {getattr(args, flag)}')
    if args.lr <= 0 or args.lr_ratio <= 0:
        errors.append('--lr and --lr_ratio must be positive')
    if args.loss_type not in ('l1', 'l2') and args.batch_size < 2:
        errors.append(f'--loss_type {args.loss_type} compares images within a batch: --batch_size must be >= 2')
    if args.ranking_loss_alpha < 0:
        errors.append('--ranking_loss_alpha must be >= 0')
    if args.warmup_epochs >= args.epochs and args.warmup_epochs > 0:
        errors.append(f'--warmup_epochs {args.warmup_epochs} must be smaller than --epochs {args.epochs}')
    if not 0 <= args.val_ratio < 1:
        errors.append(f'--val_ratio must be at least 0 and below 1, got {args.val_ratio}')
    if args.patience < 1:
        errors.append('--patience must be at least 1 (use --no_early_stopping to turn it off)')
    if args.no_pretrained and args.pretrained_path:
        errors.append('--no_pretrained and --pretrained_path contradict each other')
    for name in args.cross_test:
        if name not in data_loader.DEFAULT_ROOTS:
            errors.append(f'--cross_test {name}: not a data set name ({", ".join(data_loader.DEFAULT_ROOTS)})')
    if args.pretrained_path and not os.path.isfile(args.pretrained_path):
        errors.append(f'--pretrained_path {args.pretrained_path}: no such file')
    if errors:
        raise SystemExit('train_swin.py: error: ' + '\n  '.join([''] + errors).lstrip('\n') +
                         '\nNothing was run.')
    return args


# --------------------------------------------------------------------------- evaluation

def describe_test_crop(crop, patch_num):
    """The evaluation protocol in words, for the log."""
    if crop == 'center':
        return (f'centre crop (--test_crop center, the user\'s CenterCrop default; the {patch_num} identical '
                'crops are scored once)')
    if crop == 'random':
        return f'{patch_num} random crops per image, new every epoch (--test_crop random)'
    return f'{patch_num} fixed crops per image, the same every epoch (--test_crop fixed)'


def evaluate_split(model, images_u8, mos, direction, args, device, amp, rank, world, seed, desc):
    """SRCC/PLCC/KRCC of one split (direction -1 flips a lower-is-better target)."""
    pred = predict_scores(model, images_u8, patch_size=args.patch_size, patch_num=args.test_patch_num,
                          batch_size=args.eval_batch_size, crop=args.test_crop, seed=seed,
                          device=device, amp=amp, rank=rank, world_size=world, pad_batches=args.compile,
                          desc=desc, place=False)
    return iqa_metrics.correlations(pred, direction * np.asarray(mos)), pred


# --------------------------------------------------------------------------- training

def plan_and_place(image_sets, args, device, amp, world, raw_model, log):
    """Measure a training step and an evaluation batch, plan where each image set lives and move
    the GPU sets there (iqa.data.placement.plan_and_place). Returns {name: set where it now lives}."""
    return placement.plan_and_place(
        image_sets, device=device, world_size=world, images_on=args.images_on, log=log,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        measure_step=lambda: measure_step_bytes(raw_model, args, device, amp),
        measure_eval=lambda: placement.measure_eval_bytes(raw_model, args.eval_batch_size, args.patch_size,
                                                          device, amp))


def remap_splits(dataset, kept):
    """Split index arrays after bad images were dropped (positions into the kept images)."""
    position = np.full(len(dataset.paths), -1)
    position[kept] = np.arange(len(kept))
    out = {}
    for name, idx in dataset.splits.items():
        new = position[np.asarray(idx, dtype=int)]
        out[name] = new[new >= 0]
    return out


def fmt(x, spec='.4f'):
    return '' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def decode_once(load, args, rank, world, wait_group):
    """Run load(num_workers) -> decoded images so that a data set is decoded once per machine.

    With several processes and a cache, rank 0 decodes and writes the cache while the others
    wait, then they read it. They wait in a barrier of `wait_group`, a gloo group with a long
    timeout: in the NCCL group a cold cache (KonIQ or SPAQ: minutes) ran into its 10-minute
    timeout. Rank 0 reaches the barrier even when loading fails, so the others then meet the
    same error themselves instead of waiting. Without a cache every process decodes its own
    copy, on its share of the cores.
    """
    if world == 1:
        return load(args.num_workers)
    if args.cache_dir is None:
        local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
        return load(args.num_workers or max(1, cores // local))
    if rank != 0:
        dist.barrier(group=wait_group)
        return load(args.num_workers)
    try:
        return load(args.num_workers)
    finally:
        dist.barrier(group=wait_group)


def load_cross_test(name, args, log, rank=0, world=1, wait_group=None):
    """(images, mos, direction) of one --cross_test set when its folder exists, else None."""
    if name == args.dataset or (name == 'spaq' and args.no_spaq):
        return None
    root = os.path.join(SCRIPT_DIR, data_loader.DEFAULT_ROOTS[name])
    if not os.path.isdir(root):
        return None
    label = name.upper()
    try:
        dataset = data_loader.load_dataset(name, root)
        images, kept = decode_once(
            lambda workers: data_loader.load_images(
                dataset.paths, resize_hw=tuple(args.resize), cache_dir=args.cache_dir, num_workers=workers,
                skip_bad=True, min_hw=(args.patch_size, args.patch_size), progress=rank == 0),
            args, rank, world, wait_group)
    except data_loader.DataError as err:
        # A broken side test must not cost the training run; say so loudly instead.
        log(f'WARNING: {label} cross-test skipped, {root} is not readable: {err}')
        return None
    log(f'{label} cross-test: {len(kept)} images from {root} (turn off with '
        + ('--no_spaq)' if name == 'spaq' else 'a --cross_test without it)'))
    # kept in host memory here: the memory plan of the first round decides where it lives
    return images, dataset.mos[kept], (1 if dataset.higher_is_better else -1)


def run_round(round_idx, args, state, ctx):
    """Train and evaluate one round; returns this round's best-epoch record."""
    log, rank, world, device, amp = ctx['log'], ctx['rank'], ctx['world'], ctx['device'], ctx['amp']
    round_seed = args.seed + round_idx - 1
    dataset = data_loader.load_dataset(args.dataset, args.data_root, seed=round_seed, score=args.score,
                                       val_ratio=args.val_ratio, csv_image_column=args.csv_image_column,
                                       csv_score_column=args.csv_score_column)
    images, kept = decode_once(
        lambda workers: data_loader.load_images(
            dataset.paths, resize_hw=tuple(args.resize), cache_dir=args.cache_dir, num_workers=workers,
            skip_bad=args.skip_bad_images, min_hw=(args.patch_size, args.patch_size), progress=rank == 0),
        args, rank, world, ctx.get('wait_group'))
    splits = remap_splits(dataset, kept)
    mos = dataset.mos[kept]
    if 'train' not in splits or len(splits['train']) < 2 or 'test' not in splits:
        raise SystemExit(f'{dataset.name}: no training split (found {sorted(splits)}); it can be used with '
                         'cross_dataset_test.py but not for training')
    select_on = args.select_on
    no_val = None
    if select_on == 'val' and len(splits.get('val', [])) == 0:
        no_val = '--val_ratio 0' if args.val_ratio == 0 else f'none in {dataset.split_source}'
        log(f'note: {dataset.name} has no validation split ({dataset.split_source}); the best epoch is '
            f'selected on the TEST split and results are labelled "selected on test (no validation split: '
            f'{no_val})".')
        select_on = 'test'
    log(f'Round {round_idx}/{args.train_test_num}: {dataset.name} from {dataset.root}, split: '
        f'{dataset.split_source}; train {len(splits["train"])}, val {len(splits.get("val", []))}, '
        f'test {len(splits["test"])} images; target {dataset.score_name}')
    log(f'Evaluation: {describe_test_crop(args.test_crop, args.test_patch_num)}')
    small = {name: len(splits[name]) for name in ('val', 'test') if 0 < len(splits.get(name, [])) < world}
    small.update({name: len(cross[1]) for name, cross in ctx['cross'].items() if len(cross[1]) < world})
    if small:
        raise SystemExit(too_small_message(small, world))
    ctx['open_run']()   # the data check passed: now the run gets its folder and log
    # Stored so that cross-dataset tests know which way this model's scores point.
    ctx['config']['higher_is_better'] = bool(dataset.higher_is_better)
    if rank == 0:
        runs.write_config(ctx['run_dir'], ctx['config'])

    seed_everything(round_seed)
    model = models_swin.build_model(args.model_size, use_multiscale=not args.no_multiscale,
                                    use_attention=args.attention_fusion,
                                    pretrained=not args.no_pretrained, pretrained_path=args.pretrained_path,
                                    drop_path_rate=args.drop_path_rate, dropout_rate=args.dropout_rate).to(device)
    models_swin.use_channels_last(model, device)
    runtime.seed_rank(round_seed, rank)   # after the model: its initialisation is the same on every rank
    raw_model = model
    state['params'] = models_swin.count_parameters(model)
    groups = [{'params': model.backbone_parameters(), 'lr': args.lr},
              {'params': model.head_parameters(), 'lr': args.lr * args.lr_ratio}]
    # One plan for every image set, made now that the model exists (see plan_and_place).
    # Splits are rows of the (memory-mapped) images, not copies: one copy per machine in host RAM.
    image_sets = {name: data_loader.ImageRows(images, splits[name])
                  for name in ('train', 'val', 'test') if name == 'train' or len(splits.get(name, []))}
    del images
    for name, (cross_images, _, _) in ctx['cross'].items():
        image_sets[name] = cross_images
    image_sets = plan_and_place(image_sets, args, device, amp, world, raw_model, log)
    for name, (_, cross_mos, cross_dir) in ctx['cross'].items():
        ctx['cross'][name] = (image_sets.pop(name), cross_mos, cross_dir)
    optimizer = make_optimizer(groups, args, device)
    # Evaluation runs through the unwrapped module: the DDP wrapper's forward is a collective (it
    # broadcasts buffers), so a rank with fewer evaluation batches than another would leave the
    # others waiting in it. Rank 0's buffers are broadcast before each evaluation instead.
    eval_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        # Static shapes: training batches are all --batch_size (drop_last) and evaluation is padded
        # to the same size, so the model compiles twice, at the first training step and the first
        # evaluation (train and eval mode), and never again (BENCHMARKS.md: what compiles when).
        model = compile_model(model)
        eval_model = model if world == 1 else compile_model(eval_model)

    sampler = data_loader.TrainPatchSampler(
        image_sets.pop('train'), mos[splits['train']], patch_size=args.patch_size, patch_num=args.train_patch_num,
        batch_size=args.batch_size, color_jitter=not args.no_color_jitter, seed=round_seed, device=device,
        rank=rank, world_size=world, drop_last=args.compile, place=False)
    eval_sets = {name: (imgs, mos[splits[name]]) for name, imgs in image_sets.items()}
    del image_sets

    first_epoch = 0
    best = None
    bad_epochs = 0
    resume = state.pop('resume_checkpoint', None)
    if resume is not None and resume['round'] == round_idx:
        first_epoch, best, bad_epochs = ckpt.restore_training_state(resume, raw_model, optimizer, rank)
        log(f'Resumed round {round_idx} after epoch {first_epoch} (best so far: '
            f'{json.dumps(best) if best else "none"})')

    run_dir = ctx['run_dir']
    ckpt_dir = run_dir if args.train_test_num == 1 else os.path.join(run_dir, f'round{round_idx}')
    saver = ckpt.CheckpointSaver(ckpt_dir, keep=args.keep_checkpoints) if rank == 0 else None

    header = 'Epoch\tTrain_Loss\tTrain_SRCC\t' + ('Val_SRCC\t' if 'val' in eval_sets else '') + \
             'Test_SRCC\tTest_PLCC' + ''.join(f'\t{n.upper()}_SRCC\t{n.upper()}_PLCC' for n in ctx['cross'])
    log(header)
    status = 'finished'
    for epoch in range(first_epoch, args.epochs):
        lr_backbone, lr_head = learning_rates(epoch, args)
        optimizer.param_groups[0]['lr'], optimizer.param_groups[1]['lr'] = lr_backbone, lr_head
        try:
            train_loss, train_srcc, patches_per_s, seconds = train_one_epoch(
                model, optimizer, sampler, epoch, args, device, amp, rank, world,
                f'Round {round_idx} epoch {epoch + 1}/{args.epochs}', total_loss)
        except FloatingPointError as err:
            log(f'STOPPED: {err}. The model diverged (try a lower --lr or --max_grad_norm); the last good '
                f'checkpoints in {run_dir} are intact.')
            state['status'] = 'diverged'
            return best, 'diverged'
        row = runs.new_row(runs.swin_metric_columns(args.cross_test))
        row.update({'round': round_idx, 'epoch': epoch + 1, 'lr_backbone': f'{lr_backbone:.3e}',
                    'lr_head': f'{lr_head:.3e}', 'train_loss': fmt(train_loss), 'train_srcc': fmt(train_srcc)})
        eval_seed = round_seed * 1000 + epoch if args.test_crop == 'random' else round_seed
        results = {}
        runtime.broadcast_buffers(raw_model, world)
        for name, (imgs, split_mos) in eval_sets.items():
            results[name], _ = evaluate_split(eval_model, imgs, split_mos, 1, args, device, amp, rank, world,
                                              eval_seed, f'{name} eval')
            for metric in ('srcc', 'plcc', 'krcc'):
                row[f'{name}_{metric}'] = fmt(results[name][metric])
        for name, (cross_images, cross_mos, cross_dir) in ctx['cross'].items():
            direction = cross_dir * (1 if dataset.higher_is_better else -1)
            results[name], _ = evaluate_split(eval_model, cross_images, cross_mos, direction, args, device, amp,
                                              rank, world, eval_seed, f'{name.upper()} eval')
            row[f'{name}_srcc'], row[f'{name}_plcc'] = fmt(results[name]['srcc']), fmt(results[name]['plcc'])
        row['epoch_seconds'] = f'{seconds:.1f}'
        row['train_patches_per_s'] = f'{patches_per_s:.1f}'

        score = results[select_on]['srcc']
        improved = selectable(results, select_on) and (
            best is None or math.isnan(best['select_srcc']) or  # a NaN best from an older run's last.pkl
            score > best['select_srcc'] + args.early_stopping_min_delta)
        if not selectable(results, select_on):
            log(f'  note: epoch {epoch + 1} has a NaN SRCC/PLCC (constant predictions?); it is logged '
                'but never selected')
        if improved:
            bad_epochs = 0
            best = {'epoch': epoch + 1, 'select_srcc': score, 'select_on': select_on,
                    'val_srcc': results.get('val', {}).get('srcc'), 'val_plcc': results.get('val', {}).get('plcc'),
                    'test_srcc': results['test']['srcc'], 'test_plcc': results['test']['plcc'],
                    'test_krcc': results['test']['krcc']}
        else:
            bad_epochs += 1
        row['is_best'] = int(improved)
        state['rows'].append(row)

        log('%d\t%.4f\t\t%.4f\t\t%s%.4f\t\t%.4f%s' % (
            epoch + 1, train_loss, train_srcc,
            f'{results["val"]["srcc"]:.4f}\t\t' if 'val' in results else '', results['test']['srcc'],
            results['test']['plcc'],
            ''.join(f'\t{results[n]["srcc"]:.4f}\t\t{results[n]["plcc"]:.4f}' for n in ctx['cross']))
            + f'\t({seconds:.0f} s, {patches_per_s:.0f} patches/s, lr {lr_backbone:.2e}/{lr_head:.2e})'
            + ('  * best' if improved else ''))

        stop_now = not args.no_early_stopping and bad_epochs >= args.patience
        rng_state = ckpt.gather_rng_states(world)   # every rank's, for --resume
        if rank == 0:
            # the evaluation protocol goes in the checkpoint's metrics; metrics.csv stays numbers only
            checkpoint = {'state_dict': raw_model.state_dict(), 'config': ctx['config'], 'epoch': epoch + 1,
                          'round': round_idx, 'metrics': {**row, 'test_crop': args.test_crop},
                          'code_version': ctx['config']['code_version']}
            ckpt.save_epoch(saver, checkpoint, best=best, improved=improved, name_keys=('test_srcc', 'test_plcc'),
                            selection=f'{select_on} SRCC {score:.4f}', log=log, optimizer=optimizer,
                            bad_epochs=bad_epochs, state=state, round_complete=stop_now or epoch + 1 == args.epochs,
                            rng_state=rng_state)
            runs.write_metrics(run_dir, state['rows'])
            write_summary(run_dir, args, state, best, select_on, 'running')
        if stop_now:
            log(f'Early stopping: no {select_on} SRCC gain > {args.early_stopping_min_delta} for '
                f'{args.patience} epochs.')
            status = 'stopped_early'
            break
    if best is None:
        log(f'note: no epoch of round {round_idx} had a finite {select_on} SRCC; no best checkpoint')
        return None, status
    best['select_on'] = select_on
    if no_val:
        best['no_val'] = no_val
    if 'test' in eval_sets and rank == 0:
        # Bootstrap intervals of the selected epoch, from its saved weights.
        best.update(best_intervals(raw_model, eval_model, best, eval_sets['test'], args,
                                   device, amp,
                                   round_seed * 1000 + best['epoch'] - 1 if args.test_crop == 'random' else round_seed))
    return best, status


def selectable(results, select_on):
    """An epoch can be the best only when its selection SRCC and the test SRCC/PLCC that name
    its checkpoint are numbers: constant predictions early in training give NaN, an outcome
    to log, not an improvement (nor a reason to crash)."""
    values = (results[select_on]['srcc'], results['test']['srcc'], results['test']['plcc'])
    return all(v is not None and math.isfinite(v) for v in values)


def best_intervals(raw_model, model, best, test_set, args, device, amp, seed):
    """95% bootstrap intervals of the selected epoch's test SRCC/PLCC: the saved weights are loaded
    into raw_model and scored through `model` (the compiled one under --compile, which shares
    raw_model's parameters), exactly as every evaluation during training was."""
    path = best.get('checkpoint')
    if not path or not os.path.exists(path):
        return {}
    raw_model.load_state_dict(ckpt.load_checkpoint(path)['state_dict'])
    pred = predict_scores(model, test_set[0], patch_size=args.patch_size, patch_num=args.test_patch_num,
                          batch_size=args.eval_batch_size, crop=args.test_crop, seed=seed,
                          device=device, amp=amp, pad_batches=args.compile, place=False)
    mos = test_set[1]
    return {'test_srcc_ci': list(iqa_metrics.bootstrap_ci(pred, mos, 'srcc')),
            'test_plcc_ci': list(iqa_metrics.bootstrap_ci(pred, mos, 'plcc'))}


def write_summary(run_dir, args, state, best, select_on, status):
    runs.write_summary(
        run_dir, {'run_name': state['run_name'], 'name': args.name, 'select_on': select_on,
                  # the evaluation protocol: numbers of different protocols are not comparable
                  'test_crop': args.test_crop, 'test_patch_num': args.test_patch_num},
        state, best, status, median_of=('srcc', 'plcc'),
        tail={'train_patches_per_s': state['rows'][-1]['train_patches_per_s'] if state['rows'] else None,
              'params': state.get('params')})


def resolve_resume(path):
    """The checkpoint to resume from (RUN_DIR/last.pkl or the file given), loaded."""
    ckpt_path = runs.find_resume_file(path, '--resume')
    checkpoint = ckpt.load_checkpoint(ckpt_path)
    if checkpoint.get('optimizer') is None or checkpoint.get('config') is None:
        raise SystemExit(f'--resume {ckpt_path}: this checkpoint has no training state (optimizer, RNG); '
                         'resume from the run folder or its last.pkl')
    return ckpt_path, checkpoint


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resume, ignored = None, []
    if args.resume:
        resume_path, resume = resolve_resume(args.resume)
        stored = dict(resume['config'])
        ignored = runs.resume_args(args, parser, stored, MACHINE_FLAGS, 'resume')
        if 'val_ratio' not in stored:
            args.val_ratio = 0.0  # a run from before validation splits: keep its training images
        args.resume = resume_path
    warnings = []
    args = check_args(args, warnings.append)

    rank, world, device = setup_distributed(args.device)
    runtime.warn_idle_gpus(device, world, warnings.append)
    amp = set_precision(args.precision, device)
    if args.cache_dir in ('none', ''):
        args.cache_dir = None

    if resume is not None:
        run_dir, run_name = runs.resumed_run(resume_path, args.train_test_num)
    else:
        run_dir = None   # created by open_run once the data check passed (rank 0's name for all)
        run_name = runs.run_name(args.dataset if os.sep not in args.dataset else
                                 os.path.splitext(os.path.basename(args.dataset))[0],
                                 args.ranking_loss_alpha, datetime.datetime.now())
    console = runtime.capture_console() if rank == 0 else None

    log = runtime.rank_log(rank)
    try:
        runtime.log_warnings(log, warnings, ignored)
        config = dict(vars(args))
        config.update(run_name=run_name, code_version=runs.code_version(),
                      command='python train_swin.py ' + ' '.join(argv), world_size=world)
        if resume is not None:
            config['code_version'] = resume['config'].get('code_version', config['code_version'])
            config['command'] = resume['config'].get('command', config['command'])
        log('=' * 72)
        log(f'Run {run_name}  ({"resumed" if resume else "new"}, {world} process(es), device {device}, '
            f'precision {"bf16 autocast (target net fp32)" if amp else "fp32"})')
        for key in sorted(vars(args)):
            log(f'  {key:<26} {getattr(args, key)}')
        log('=' * 72)
        state = {'run_name': run_name, 'rows': [], 'rounds': [], 'start_time': time.time()}
        first_round = 1
        if resume is not None:
            first_round = runs.resume_rounds(resume, state, log)
            state['rows'] = runs.read_metrics(run_dir, (resume['round'], resume['epoch']))
        # decode_once waits here (gloo, no NCCL timeout) while rank 0 decodes a cold cache
        wait_group = dist.new_group(backend='gloo', timeout=datetime.timedelta(days=1)) if world > 1 else None
        ctx = {'log': log, 'rank': rank, 'world': world, 'device': device, 'amp': amp, 'run_dir': None,
               'wait_group': wait_group}
        ctx['cross'] = {name: sets for name in args.cross_test
                        if (sets := load_cross_test(name, args, log, rank, world, wait_group)) is not None}

        def open_run():
            if ctx['run_dir'] is None:
                ctx['run_dir'], name = runtime.open_run(args.output_dir, args.log_dir, run_name, run_dir, rank, world)
                config['run_name'] = state['run_name'] = name
        ctx['open_run'] = open_run
        # the run's status is its last round's: a resumed, already ended last round keeps its own
        status = 'stopped_early' if resume is not None and resume['epoch'] < args.epochs else 'finished'
        best = None
        ctx['config'] = config
        for round_idx in range(first_round, args.train_test_num + 1):
            best, status = run_round(round_idx, args, state, ctx)
            if status == 'diverged':
                break
            state['rounds'].append(best)
        ctx['open_run']()   # a resumed run whose rounds had all ended ran none
        run_dir = ctx['run_dir']
        if rank == 0:
            final = 'diverged' if status == 'diverged' else status
            if status != 'diverged' and not any(state['rounds']):
                write_summary(run_dir, args, state, None, args.select_on, final)
                log(f'Run folder: {run_dir}')
                log('No epoch had a finite SRCC: nothing was selected (see metrics.csv)')
            elif status != 'diverged':
                best = best or next(r for r in reversed(state['rounds']) if r)
                write_summary(run_dir, args, state, best, best['select_on'], final)
                finished = [r for r in state['rounds'] if r]
                label = 'selected on val' if best['select_on'] == 'val' else 'selected on test'
                if best.get('no_val'):
                    label += f' (no validation split: {best["no_val"]})'
                if args.train_test_num > 1:
                    log('Testing median SRCC %.4f, median PLCC %.4f over %d rounds' % (
                        np.median([r['test_srcc'] for r in finished]),
                        np.median([r['test_plcc'] for r in finished]), len(finished)))
                    srcc, plcc = (np.median([r['test_srcc'] for r in finished]),
                                  np.median([r['test_plcc'] for r in finished]))
                else:
                    srcc, plcc = best['test_srcc'], best['test_plcc']
                ci = ''
                if best.get('test_srcc_ci'):
                    ci = ' (95%% CI SRCC %.4f-%.4f, PLCC %.4f-%.4f)' % (*best['test_srcc_ci'], *best['test_plcc_ci'])
                log(f'Run folder: {run_dir}')
                log('Best test SRCC %.4f PLCC %.4f (epoch %d, %s)%s' % (srcc, plcc, best['epoch'], label, ci))
            else:
                write_summary(run_dir, args, state, best, args.select_on, 'diverged')
        return 0 if status != 'diverged' else 3
    except (data_loader.DataError, models_swin.PretrainedWeightsError) as err:
        runtime.stop_run(err, log)
    finally:
        runtime.end_run(console, world)


if __name__ == '__main__':
    sys.exit(main())
