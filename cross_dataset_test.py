"""Score a trained checkpoint on other IQA data sets, on arbitrary images, or measure model cost.

    python cross_dataset_test.py --checkpoint RUN/best_model_srcc_0.9378_plcc_0.9485.pkl
    python cross_dataset_test.py --checkpoint CKPT --datasets spaq kadid=/data/kadid10k
    python cross_dataset_test.py --checkpoint CKPT --images photos/ more/*.png list.txt --output scores.csv
    python cross_dataset_test.py --complexity [--sizes tiny small base resnet50]

Three modes, one per question the user asks after training:

* cross-dataset (default): how well does a KonIQ-trained model generalise? Every data set is
  scored with the crops training-time evaluation uses (iqa.evaluation.predict_scores), and SRCC/PLCC
  come with 95% bootstrap intervals over images, so a +0.0025 SRCC difference between two runs
  can be told apart from noise. Results go to cross_dataset_results_<size>_<checkpoint>.json.
  What is scored of each set is iqa/scoring.py's one rule, for Swin and CLIP checkpoints: the
  run's own test split of its training set (redrawn from the checkpoint), every image of others.
* --images: one score per image file, for images that have no MOS.
* --complexity: params, FLOPs, latency and throughput of every model size, the paper's table.

The model is rebuilt from the configuration a train_swin.py checkpoint stores; the user's old
bare state_dicts load too (the architecture is read off the weight names and shapes).
Nothing is downloaded: the model is built with random weights and the checkpoint loaded strictly.
"""
import contextlib
import csv
import glob
import io
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data_loader
import models_swin
from iqa import evaluation, runtime, scoring
from iqa import metrics as iqa_metrics
from iqa.ckpt import load_checkpoint
from iqa.clip import evaluation as clip_eval
from iqa.engine import count_flops
from iqa.files import atomic_write_json, atomic_write_text
from iqa.runs import code_version
from iqa.runtime import HelpFormatter, UsageError, device_name, resolve_device, use_bf16
from iqa.scoring import is_training_set  # noqa: F401  (the rule's home; tests use it here)

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASETS = ('koniq', 'spaq', 'kadid', 'agiqa')
DEFAULT_CACHE_DIR = os.path.join(SCRIPT_DIR, '.cache', 'images')  # shared with train_swin.py
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jfif', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif',
                    '.ppm', '.pgm', '.pnm')
LIST_EXTENSIONS = ('.txt', '.lst')
# Images decoded and scored at a time in --images mode: bounds memory (64 x 512x384 RGB is 38 MB)
# however many files are given, and lets the progress bar move.
IMAGES_PER_CHUNK = 64
EXIT_NOTHING_TO_SCORE = 2


# --------------------------------------------------------------------------- flags

def build_parser():
    # train_swin's parser: an unknown or misspelt flag stops with a "did you mean" hint
    p = runtime.SuggestingParser(
        prog='cross_dataset_test.py', allow_abbrev=False,
        description='Evaluate a trained HyperIQA checkpoint on several IQA data sets (default), score '
                    'arbitrary images (--images), or print the model-complexity table (--complexity).',
        formatter_class=HelpFormatter)

    g = p.add_argument_group('Checkpoint and model')
    g.add_argument('--checkpoint', metavar='FILE',
                   help='best_model_*.pkl or last.pkl of a train_swin.py run, or an old bare state_dict '
                        '(required except with --complexity)')
    g.add_argument('--model_size', default=None, choices=models_swin.MODEL_SIZES,
                   help='override the size stored in the checkpoint / inferred from its weights')
    g.add_argument('--attention_fusion', action='store_true', help='override: the model has attention fusion')
    g.add_argument('--no_multiscale', action='store_true', help='override: the model is single-scale')

    g = p.add_argument_group('Data sets (default mode)')
    g.add_argument('--datasets', nargs='+', default=list(DEFAULT_DATASETS), metavar='NAME[=PATH]',
                   help='data set names (koniq, spaq, kadid, agiqa, livec, live, csiq, tid2013, bid) at '
                        'their default folders next to this script, NAME=PATH for another folder or '
                        'annotation file, or a path to a .csv/.json list of images and scores '
                        f'(default: {" ".join(DEFAULT_DATASETS)})')
    g.add_argument('--split', default='auto', choices=('auto', 'test', 'val', 'all'),
                   help='images scored. auto: of the data set the run was trained on, its own held-out test '
                        'split, redrawn from the checkpoint (seed + round - 1, ratios, score columns); of any other '
                        'set, every image, whatever its reader\'s split (the cross-dataset protocol); test: the '
                        'run\'s test split of its training set, the reader\'s test split of other sets; val: the '
                        'run\'s validation split (other sets: the reader\'s); all: every image (default: auto)')
    g.add_argument('--trained_on', default=None, metavar='NAME_OR_FILE',
                   help='the data set the checkpoint was trained on (default: the --dataset in its config; '
                        'unknown for bare state_dicts, e.g. --trained_on koniq for the user\'s old ones)')
    g.add_argument('--score', default=None, metavar='COLUMN',
                   help='score column of the training data set (default: the run\'s --score)')
    g.add_argument('--csv_image_column', default=None, metavar='COL',
                   help='image column of CSV lists (default: the run\'s for its own CSV, else "image")')
    g.add_argument('--csv_score_column', default=None, metavar='COL',
                   help='score column of CSV lists (default: the run\'s for its own CSV, else "score")')
    g.add_argument('--n_boot', type=int, default=1000, metavar='N',
                   help='bootstrap resamples of the 95%% intervals (0 = none)')
    g.add_argument('--output_dir', default='.', metavar='DIR', help='folder of the results JSON')
    g.add_argument('--cache_dir', default=None, metavar='DIR',
                   help=f'decoded-image cache ("none" disables it; default: {DEFAULT_CACHE_DIR} for '
                        'data sets, none for --images)')

    g = p.add_argument_group('Arbitrary images')
    g.add_argument('--images', nargs='+', default=None, metavar='DIR_GLOB_OR_LIST',
                   help='score these images: folders (walked for image files), globs, image files, '
                        'or .txt files listing one path per line')
    g.add_argument('--output', default=None, metavar='FILE',
                   help='--images: the CSV written (default scores.csv); --complexity: also write the '
                        'markdown table here')

    g = p.add_argument_group('Evaluation (defaults: what the checkpoint was trained with)')
    g.add_argument('--test_patch_num', type=int, default=None, metavar='N',
                   help='crops per image, scores averaged (default: the checkpoint\'s, else 20)')
    g.add_argument('--test_crop', default=None, choices=data_loader.EVAL_CROPS,
                   help='crop positions: fixed (spread out, the same every time), random (drawn from --seed), '
                        'center (the user\'s CenterCrop); default: the checkpoint\'s protocol, fixed for '
                        'bare state_dicts')
    g.add_argument('--test_random_crop', action='store_true', help='same as --test_crop random (the user\'s spelling)')
    g.add_argument('--resize', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='resize every image to H x W before cropping (default: the checkpoint\'s, else 512 384)')
    g.add_argument('--batch_size', type=int, default=None, metavar='N',
                   help='patches per forward (default: the checkpoint\'s eval_batch_size, else 64; '
                        '--complexity: the throughput batch, 64)')
    g.add_argument('--seed', type=int, default=None, metavar='N',
                   help='seed of random crops and of other data sets\' reader splits (--split test/val); the '
                        'training set\'s split is always redrawn with the run\'s own seed (default: the run\'s '
                        'training seed for its round; 0 for bare state_dicts)')

    g = p.add_argument_group('Complexity table')
    g.add_argument('--complexity', action='store_true',
                   help='print params, FLOPs, latency and throughput per model size (random weights)')
    g.add_argument('--sizes', nargs='+', default=['tiny', 'small', 'base', 'resnet50'],
                   choices=models_swin.MODEL_SIZES, metavar='SIZE',
                   help=f'model sizes of the table ({", ".join(models_swin.MODEL_SIZES)})')
    g.add_argument('--runs', type=int, default=50, metavar='N',
                   help='timed batch-1 forwards per size (median reported); throughput uses max(3, N/5) batches')

    g = p.add_argument_group('Misc')
    g.add_argument('--device', default='auto', metavar='DEV', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--no_amp', action='store_true',
                   help='score in fp32 (default: as the checkpoint\'s run, its --precision; fp32 where it stores none)')
    clip_eval.add_eval_flags(p.add_argument_group('CLIP checkpoints (train_clip.py, baseline.py)'))
    g.add_argument('--num_workers', type=int, default=None, metavar='N',
                   help='threads decoding images (default: all cores)')
    return p


# --------------------------------------------------------------------------- model

def model_architecture(ckpt, args):
    """(arch dict for build_model, where it came from) for a loaded checkpoint.

    A train_swin.py checkpoint says how it was built (config: model_size, no_multiscale,
    attention_fusion); a bare state_dict does not, so its architecture is read off the weights.
    The --model_size / --attention_fusion / --no_multiscale flags override either.
    """
    config = ckpt.get('config') or {}
    if 'model_size' in config:
        single = bool(config.get('no_multiscale', False))
        arch = dict(model_size=config['model_size'], use_multiscale=not single,
                    use_attention=bool(config.get('attention_fusion', False)) and not single)
        source = 'checkpoint config'
    else:
        try:
            arch = models_swin.infer_model_config(ckpt['state_dict'])
        except ValueError as err:
            raise UsageError(f'--checkpoint {ckpt["path"]}: cannot tell the architecture from its '
                             f'weights: {err}') from None
        source = 'inferred from the weights'
    overrides = []
    if args.model_size is not None:
        arch['model_size'] = args.model_size
        overrides.append(f'--model_size {args.model_size}')
    if args.no_multiscale:
        # as in train_swin.py: attention fusion weights the multi-scale stages, so it goes too
        arch.update(use_multiscale=False, use_attention=False)
        overrides.append('--no_multiscale')
    elif args.attention_fusion:
        arch['use_attention'] = True
        overrides.append('--attention_fusion')
    if overrides:
        source += ', overridden by ' + ' '.join(overrides)
    return arch, source


def describe_arch(arch):
    fusion = ('multi-scale + attention' if arch['use_attention'] else
              'multi-scale' if arch['use_multiscale'] else 'single-scale')
    return f'{arch["model_size"]}, {fusion}'


def load_model(path, args, device):
    """(model in eval mode on `device`, checkpoint dict, arch dict, arch source).

    Built with pretrained=False (nothing downloaded: every weight comes from the checkpoint) and
    loaded with strict=True, so a checkpoint that does not match the architecture is an error
    that names the keys, never a silently half-random model.
    """
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f'--checkpoint: {err}') from None
    arch, source = model_architecture(ckpt, args)
    config = ckpt.get('config') or {}
    model = models_swin.build_model(arch['model_size'], use_multiscale=arch['use_multiscale'],
                                    use_attention=arch['use_attention'], pretrained=False,
                                    drop_path_rate=config.get('drop_path_rate', 0.2),
                                    dropout_rate=config.get('dropout_rate', 0.3))
    try:
        model.load_state_dict(ckpt['state_dict'], strict=True)
    except RuntimeError as err:
        detail = ' '.join(str(err).split())
        raise UsageError(
            f'--checkpoint {path}: its weights do not fit the model {describe_arch(arch)} ({source}): '
            f'{detail[:600]}{"..." if len(detail) > 600 else ""}\n'
            'Check --model_size / --attention_fusion / --no_multiscale, or leave them out to use '
            'what the checkpoint says.') from None
    return model.to(device).eval(), ckpt, arch, source


def eval_settings(ckpt, args):
    """Crops, resize, batch, seed and score direction: the checkpoint's training values unless a flag
    says otherwise, so a checkpoint is tested the way it was evaluated during training."""
    config = ckpt.get('config') or {}
    if args.seed is not None:
        seed = args.seed
    else:
        # train_swin.py seeds round r with seed + r - 1 (split and crops)
        seed = int(config.get('seed', 0)) + int(ckpt.get('round') or 1) - 1 if config else 0
    if args.test_random_crop and args.test_crop not in (None, 'random'):
        raise UsageError(f'--test_random_crop (= --test_crop random) contradicts --test_crop {args.test_crop}')
    test_crop = ('random' if args.test_random_crop else args.test_crop) or config.get('test_crop') or (
        'random' if config.get('test_random_crop') else 'fixed')  # runs from before --test_crop
    settings = dict(
        patch_size=int(config.get('patch_size', 224)),
        test_patch_num=_flag_or(args.test_patch_num, config.get('test_patch_num', 20)),
        test_crop=test_crop,
        test_random_crop=test_crop == 'random',
        resize=list(args.resize or config.get('resize') or [512, 384]),
        batch_size=_flag_or(args.batch_size, config.get('eval_batch_size', 64)),
        seed=seed,
        # which way the training target pointed; bare state_dicts come from KonIQ MOS (higher = better)
        higher_is_better=bool(config.get('higher_is_better', True)),
        trained_on=args.trained_on or config.get('dataset'),
        # how the run read its training data set, so that its test split is read the same way
        train_data=training_data_settings(config, args),
        # the run's validation share; a run from before validation splits had none
        val_ratio=float(config.get('val_ratio', 0.0)) if config else data_loader.DEFAULT_VAL_RATIO,
    )
    for flag in ('test_patch_num', 'batch_size'):
        if settings[flag] < 1:
            raise UsageError(f'--{flag} must be at least 1, got {settings[flag]}')
    if min(settings['resize']) < settings['patch_size']:
        raise UsageError(f'--resize {settings["resize"][0]} {settings["resize"][1]} is smaller than the '
                         f'{settings["patch_size"]}x{settings["patch_size"]} crops the model takes')
    return settings


def training_data_settings(config, args):
    """load_dataset keywords the run read its training data with (train_swin's --score and CSV
    column flags), each overridden by the same flag here.

    Without them a model trained on KonIQ 'MOS' would be tested against 'MOS_zscore', and a
    CSV with its own column names would not load at all.
    """
    return dict(score=args.score if args.score is not None else config.get('score'),
                csv_image_column=args.csv_image_column or config.get('csv_image_column') or 'image',
                csv_score_column=args.csv_score_column or config.get('csv_score_column') or 'score')


def _flag_or(value, stored):
    """A flag's value when given (0 included, so that it is checked), else the stored one."""
    return int(value if value is not None else stored)


def score_images(model, images_u8, settings, device, amp, desc=None):
    """One score per image with the crops of training-time evaluation (iqa.evaluation.predict_scores)."""
    return evaluation.predict_scores(
        model, images_u8, patch_size=settings['patch_size'], patch_num=settings['test_patch_num'],
        batch_size=settings['batch_size'], crop=settings['test_crop'],
        seed=settings['seed'], device=device, amp=amp, desc=desc)


# --------------------------------------------------------------------------- data sets

def parse_dataset_specs(items):
    """[(label, canonical name, root Path)] from --datasets items: NAME, NAME=PATH or a list file."""
    specs = []
    for item in items:
        label, sep, path = item.partition('=')
        label, path = label.strip(), path.strip()
        if sep and (not label or not path):
            raise UsageError(f'--datasets {item}: expected NAME=PATH, e.g. kadid=/data/kadid10k')
        try:
            if not sep:
                name, root = data_loader.resolve_dataset(label)
            else:
                try:
                    name, root = data_loader.resolve_dataset(label, path)
                except data_loader.DataError:
                    # a label of the user's own for an annotation file: mylist=/data/list.csv
                    name, root = data_loader.resolve_dataset(path)
                    if name != data_loader.GENERIC:
                        raise
        except data_loader.DataError as err:
            raise UsageError(f'--datasets {item}: {err}') from None
        if name == data_loader.GENERIC and not sep:
            label = os.path.splitext(os.path.basename(label))[0]
        specs.append((label, name, root))
    labels = [s[0] for s in specs]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise UsageError(f'--datasets names {dup!r} twice; give each data set once')
    return specs


def evaluate_dataset(model, label, name, root, settings, args, device, amp, cache_dir, run):
    """Score one data set (the images scoring.select_images chooses); returns its entry of the results JSON.

    MOS is multiplied by -1 where the data set's direction differs from the training target's
    (e.g. a model trained on KonIQ MOS tested on LIVE DMOS), so a good model has positive SRCC.
    """
    seed = settings['seed']
    # another data set: its standard target; CSV column flags, when given, name its columns
    read = dict(csv_image_column=args.csv_image_column or 'image', csv_score_column=args.csv_score_column or 'score')
    chosen = scoring.select_images(label, name, root, run, args.split, seed=seed, val_ratio=settings['val_ratio'],
                                   read=read)
    chosen.announce(label)
    # No minimum size (train_swin.py refuses images smaller than a crop for training): every image
    # is resized before cropping, as the original cross-dataset script did, so any size can be scored.
    images, kept = data_loader.load_images(chosen.paths, resize_hw=tuple(settings['resize']), cache_dir=cache_dir,
                                           num_workers=args.num_workers, skip_bad=True)
    direction = 1.0 if chosen.higher_is_better == settings['higher_is_better'] else -1.0
    mos = direction * chosen.mos[kept]
    pred = score_images(model, images, settings, device, amp, desc=f'{label} ({len(kept)} images)')
    del images
    result = {'dataset': chosen.name, 'images': int(len(kept)), **iqa_metrics.correlations(pred, mos),
              # the protocol with every number: scores of different crop protocols are not comparable
              'test_crop': settings['test_crop'], 'test_patch_num': settings['test_patch_num']}
    if args.n_boot > 0:
        for metric in ('srcc', 'plcc'):
            result[f'{metric}_ci'] = list(iqa_metrics.bootstrap_ci(pred, mos, metric, n_boot=args.n_boot,
                                                                   seed=seed))
    result.update(chosen.record(kept), mos_flipped=direction < 0)
    return result


def results_path(output_dir, checkpoint_path, model_size):
    """cross_dataset_results_<size>_<stem>.json, the user's file name.

    last.pkl of every run has the same stem, so its run folder's name is added to keep two runs
    from overwriting each other's results.
    """
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    if stem == 'last':
        stem = f'{os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path)))}_last'
    return os.path.join(output_dir, f'cross_dataset_results_{model_size}_{stem}.json')


def fmt_ci(value, ci):
    text = '-' if value is None or math.isnan(value) else f'{value:.4f}'
    if ci and all(c is not None and not math.isnan(c) for c in ci):
        text += f' [{ci[0]:.4f}, {ci[1]:.4f}]'
    return text


def results_table(results):
    """Markdown table, one row per scored data set, each with the number of images it rests on."""
    lines = ['| dataset | images | split | SRCC [95% CI] | PLCC [95% CI] | KRCC |', '|---|---:|---|---|---|---:|']
    for label, r in results.items():
        krcc = '-' if math.isnan(r['krcc']) else f'{r["krcc"]:.4f}'
        lines.append(f'| {label} | {r["images"]} | {r["split"]} | {fmt_ci(r["srcc"], r.get("srcc_ci"))} | '
                     f'{fmt_ci(r["plcc"], r.get("plcc_ci"))} | {krcc} |')
    return '\n'.join(lines)


def checkpoint_amp(ckpt, device, no_amp):
    """Whether a HyperIQA checkpoint is scored under bf16 autocast: as its run trained and
    evaluated it (the stored --precision / --no_amp), on CUDA only; --no_amp forces fp32. A
    checkpoint that stores no precision (the user's original code) is scored in fp32, as it was."""
    if no_amp or device.type != 'cuda':
        return False
    config = ckpt.get('config') or {}
    if 'precision' not in config:
        return False
    return use_bf16('fp32' if config.get('no_amp') else config['precision'], device)


def run_cross_dataset(args, device, amp):
    specs = parse_dataset_specs(args.datasets)
    model, ckpt, arch, source = load_model(args.checkpoint, args, device)
    amp = checkpoint_amp(ckpt, device, args.no_amp)
    settings = eval_settings(ckpt, args)
    cache_dir = DEFAULT_CACHE_DIR if args.cache_dir is None else (
        None if args.cache_dir.lower() in ('none', '') else args.cache_dir)
    print(f'Checkpoint {args.checkpoint}: {describe_arch(arch)} ({source}), '
          f'{models_swin.count_parameters(model) / 1e6:.2f} M params'
          + (f', trained on {settings["trained_on"]}' if settings['trained_on'] else ''))
    crops = ('the centre' if settings['test_crop'] == 'center' else
             f'{settings["test_patch_num"]} {settings["test_crop"]}')
    print(f'Evaluation: {crops} {settings["patch_size"]}px crop(s) (--test_crop {settings["test_crop"]}) of images '
          f'resized to {settings["resize"][0]}x{settings["resize"][1]}, '
          f'batch {settings["batch_size"]}, device {device}, bf16 autocast {"on" if amp else "off"}, '
          f'seed {settings["seed"]}', flush=True)

    run = scoring.swin_run(ckpt, args.trained_on, settings['train_data'], settings['val_ratio'])
    results, missing, failed = scoring.score_each(specs, lambda label, name, root: evaluate_dataset(
        model, label, name, root, settings, args, device, amp, cache_dir, run))

    if not results:
        lines = ['No data set could be scored.']
        if missing:
            lines.append('Not found: ' + ', '.join(f'{k} at {v}' for k, v in missing.items()))
        if failed:
            lines.append('Unreadable: ' + '; '.join(f'{k}: {v.splitlines()[0]}' for k, v in failed.items()))
        lines.append('Put the data sets in those folders, or point at them with --datasets NAME=PATH '
                     '(e.g. --datasets spaq=/data/spaq-test kadid=/data/kadid10k).')
        raise UsageError('\n'.join(lines))

    in_domain = [label for label, r in results.items() if r['training_set']]
    cross = {k: r for k, r in results.items() if k not in in_domain}
    cross_mean = None
    if settings['trained_on'] and cross:  # unknown for bare state_dicts: no in-domain set to leave out
        cross_mean = {'datasets': list(cross), 'images': {k: r['images'] for k, r in cross.items()},
                      'srcc': float(np.mean([r['srcc'] for r in cross.values()])),
                      'plcc': float(np.mean([r['plcc'] for r in cross.values()]))}
    config = ckpt.get('config') or {}
    out = {
        'checkpoint': os.path.abspath(args.checkpoint),
        'checkpoint_format': ckpt['format'],
        'model_size': arch['model_size'],
        'model': {**arch, 'source': source, 'params': models_swin.count_parameters(model)},
        'trained_on': settings['trained_on'],
        'split': args.split,
        'training_data_settings': settings['train_data'],
        'run_name': config.get('run_name'),
        'epoch': ckpt.get('epoch'),
        'test_patch_num': settings['test_patch_num'],
        'test_crop': settings['test_crop'],
        'test_random_crop': settings['test_random_crop'],
        'patch_size': settings['patch_size'],
        'resize': settings['resize'],
        'seed': settings['seed'],
        'n_boot': args.n_boot,
        'higher_is_better': settings['higher_is_better'],
        'device': str(device),
        'amp': amp,
        'code_version': code_version(),
        'results': results,
        'in_domain': in_domain,
        'cross_domain_mean': cross_mean,
        'missing': missing,
        'failed': failed,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = results_path(args.output_dir, args.checkpoint, arch['model_size'])
    atomic_write_json(path, out)

    print()
    print(results_table(results))
    if cross_mean is not None:
        counts = ', '.join(f'{k}: {r["images"]} images' for k, r in cross.items())
        print(f'\nMean over the {len(cross)} cross-domain data sets ({counts}): '
              f'SRCC {cross_mean["srcc"]:.4f}, PLCC {cross_mean["plcc"]:.4f}')
    for label, r in results.items():
        if r['skipped_images']:
            print(f'note: {label}: {r["skipped_images"]} unreadable image(s) left out (listed above)')
        if r['mos_flipped']:
            print(f'note: {label}: {r["score"]} points the other way from the training target; '
                  'scored against -MOS so that a good model has positive SRCC')
    print(f'\nResults written to {path}')
    return scoring.report_skipped(missing, failed)


# --------------------------------------------------------------------------- arbitrary images

def expand_image_specs(specs):
    """Image paths from --images items, in the order given, each path once.

    A folder is walked (hidden files and folders skipped: macOS '._x.jpg' files are not images);
    a .txt/.lst file lists one path per line (relative to the list's folder; blank lines and
    '#' comments ignored); another existing file is an image whatever its extension; anything
    else is a glob. An item that yields nothing is an error, since a typo would otherwise
    produce an empty CSV.
    """
    paths = []
    for spec in specs:
        found = []
        if os.path.isdir(spec):
            for folder, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                found += [os.path.join(folder, f) for f in sorted(files)
                          if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(spec) and spec.lower().endswith(LIST_EXTENSIONS):
            base = os.path.dirname(spec)
            with open(spec, encoding='utf-8-sig') as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith('#'):
                        found.append(line if os.path.isabs(line) else os.path.join(base, line))
        elif os.path.isfile(spec):
            found.append(spec)
        else:
            found = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not found:
            what = 'folder has no image files' if os.path.isdir(spec) else (
                'list file names no image' if os.path.isfile(spec) else 'no such file, and as a glob it matches nothing')
            raise UsageError(f'--images {spec}: {what} (image extensions: {" ".join(IMAGE_EXTENSIONS)})')
        paths += found
    return list(dict.fromkeys(paths))


def unreadable_reason(path):
    """Why load_images left an image out: it prints the reasons, but returns only what it kept."""
    if not os.path.exists(path):
        return 'file not found'
    if os.path.isdir(path):
        return 'is a folder'
    try:
        from PIL import Image
        with Image.open(path) as im:
            im.load()
    except Exception as err:  # every decoding failure is a reason to report, not to stop
        return f'cannot decode image ({type(err).__name__}: {err})'
    return 'cannot be used as an image'


def run_images(args, device, amp):
    """Score every image given with --images and write path,score,error rows to --output."""
    paths = expand_image_specs(args.images)
    output = args.output or 'scores.csv'
    model, ckpt, arch, source = load_model(args.checkpoint, args, device)
    amp = checkpoint_amp(ckpt, device, args.no_amp)
    settings = eval_settings(ckpt, args)
    cache_dir = None if args.cache_dir is None or args.cache_dir.lower() in ('none', '') else args.cache_dir
    print(f'Scoring {len(paths)} images with {args.checkpoint} ({describe_arch(arch)}, {source}); '
          f'{settings["test_patch_num"]} crops per image, device {device}', flush=True)
    scores = [None] * len(paths)
    errors = [''] * len(paths)
    bar = tqdm(total=len(paths), desc='scoring', unit='img', file=sys.stderr, mininterval=1.0)
    for start in range(0, len(paths), IMAGES_PER_CHUNK):
        chunk = paths[start:start + IMAGES_PER_CHUNK]
        quiet = io.StringIO()
        try:
            # load_images reports every chunk; one list at the end reads better for many chunks
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                images, kept = data_loader.load_images(chunk, resize_hw=tuple(settings['resize']),
                                                       cache_dir=cache_dir, num_workers=args.num_workers,
                                                       skip_bad=True, progress=False)
        except data_loader.DataError:  # none of the chunk is usable
            images, kept = None, np.zeros(0, dtype=np.int64)
        # One image per call: the fixed evaluation crops depend on an image's position in the
        # tensor, and a file's score must not depend on which other files were listed with it.
        for row, j in enumerate(kept):
            scores[start + int(j)] = float(score_images(model, images[row:row + 1], settings, device, amp)[0])
            bar.update(1)
        for j in sorted(set(range(len(chunk))) - {int(k) for k in kept}):
            errors[start + j] = unreadable_reason(chunk[j])
            bar.update(1)
    bar.close()

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['path', 'score', 'error'])
    for path, score, error in zip(paths, scores, errors):
        writer.writerow([path, '' if score is None else f'{score:.6f}', error])
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(output, buf.getvalue())

    n_bad = sum(1 for e in errors if e)
    direction = 'higher is better' if settings['higher_is_better'] else 'lower is better'
    print(f'{len(paths) - n_bad} of {len(paths)} images scored ({direction}, on the scale of the '
          f'training target{" of " + settings["trained_on"] if settings["trained_on"] else ""}); '
          f'written to {output}')
    if n_bad:
        print(f'{n_bad} unreadable image(s), listed in {output} with an empty score:')
        for path, error in zip(paths, errors):
            if error:
                print(f'  {path}: {error}')
    return 0 if n_bad < len(paths) else 1


# --------------------------------------------------------------------------- complexity

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_forward(model, x, runs, warmup, amp, device):
    """Seconds of each of `runs` forward passes after `warmup` untimed ones (CUDA synchronised)."""
    times = []
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        for i in range(warmup + runs):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def measure_complexity(size, device, batch_size, runs, amp):
    """One table row: params, FLOPs at 1x3x224x224, batch-1 latency and batch throughput.

    Swin sizes are the full model of the paper (multi-scale + attention fusion); resnet50 is the
    original HyperIQA (single-scale). Random weights: cost does not depend on their values.
    """
    full = size != 'resnet50'
    model = models_swin.build_model(size, use_multiscale=full, use_attention=full, pretrained=False)
    model = model.to(device).eval()
    row = {'model': size, 'variant': 'multi-scale + attention' if full else 'original HyperIQA (single-scale)',
           'params': models_swin.count_parameters(model)}
    x = torch.randn(1, 3, 224, 224, device=device)
    row['flops'] = count_flops(model, x)
    latency = time_forward(model, x, runs, warmup=max(3, runs // 10), amp=amp, device=device)
    row['latency_ms'] = statistics.median(latency) * 1000
    try:
        xb = torch.randn(batch_size, 3, 224, 224, device=device)
        n_batches = max(3, runs // 5)
        batch_times = time_forward(model, xb, n_batches, warmup=2, amp=amp, device=device)
        row['throughput'] = batch_size * n_batches / sum(batch_times)
    except torch.cuda.OutOfMemoryError:
        row['throughput'] = None
        row['note'] = f'out of GPU memory at batch {batch_size}'
    del model
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return row


def complexity_table(rows, device, batch_size, runs, amp):
    lines = ['| model | variant | params (M) | GMACs | GFLOPs | latency bs1 (ms) | '
             f'throughput bs{batch_size} (img/s) |',
             '|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        throughput = f'{r["throughput"]:.1f}' if r['throughput'] else r.get('note', '-')
        lines.append(f'| {r["model"]} | {r["variant"]} | {r["params"] / 1e6:.2f} | {r["flops"] / 2e9:.2f} | '
                     f'{r["flops"] / 1e9:.2f} | {r["latency_ms"]:.2f} | {throughput} |')
    lines += [
        '',
        f'Device: {device_name(device)}; torch {torch.__version__}; '
        f'{"bf16 autocast" if amp else "float32"}; input 3x224x224 (one crop).',
        'FLOPs counted with torch.utils.flop_counter.FlopCounterMode (matrix multiplies and convolutions, '
        '1 multiply-add = 2 FLOPs). GMACs = GFLOPs / 2 is what fvcore, thop and ptflops report as '
        '"FLOPs" and most papers print (Swin-B at 224x224: 15.4G), so compare that column with such numbers.',
        f'Latency: median of {runs} batch-1 forwards after warm-up. Throughput: crops per second at '
        f'batch {batch_size}; an image scored with 20 crops costs 20 of them.',
    ]
    return '\n'.join(lines)


def run_complexity(args, device, amp):
    batch_size = 64 if args.batch_size is None else args.batch_size
    if batch_size < 1 or args.runs < 1:
        raise UsageError('--batch_size and --runs must be at least 1')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels
    rows = []
    for size in args.sizes:
        print(f'measuring {size} ...', file=sys.stderr, flush=True)
        rows.append(measure_complexity(size, device, batch_size, args.runs, amp))
    table = complexity_table(rows, device, batch_size, args.runs, amp)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + '\n')
        print(f'\nwritten to {args.output}')
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.complexity and args.images:
            raise UsageError('--complexity and --images are separate modes; give one of them')
        if not args.complexity and not args.checkpoint:
            raise UsageError('--checkpoint FILE is required (except with --complexity)')
        if args.n_boot < 0:
            raise UsageError(f'--n_boot must be >= 0, got {args.n_boot}')
        device = resolve_device(args.device)
        amp = device.type == 'cuda' and not args.no_amp
        if args.complexity:
            return run_complexity(args, device, amp)
        if clip_eval.is_clip_checkpoint(args.checkpoint):  # train_clip.py: quality + consistency
            return clip_eval.run_checkpoint(args, device, None if args.images else parse_dataset_specs(args.datasets))
        if args.images:
            return run_images(args, device, amp)
        return run_cross_dataset(args, device, amp)
    except UsageError as err:
        print(f'cross_dataset_test.py: error: {err}', file=sys.stderr, flush=True)
        return EXIT_NOTHING_TO_SCORE
    except data_loader.DataError as err:
        print(f'cross_dataset_test.py: data error: {err}', file=sys.stderr, flush=True)
        return EXIT_NOTHING_TO_SCORE


if __name__ == '__main__':
    sys.exit(main())
