"""Data of the CLIP system (train_clip.py): prompt/score CSVs, the prompt-disjoint split, CLIP pixels, the demo set.

    data.csv (name, prompt, mos_quality, mos_align[, explanation])   read_prompt_csv()
    images   -> uint8 (N, 3, S, S) through load_images   (decoded once, cached on disk)
                (training: also at train_cache_size(), up to 2 S, so crops are downsampled)
    uint8    -> normalised CLIP pixels, augmented for training       clip_pixels()

Why a split by prompt: AGIQA-3K has about ten images per prompt. A random split of the images
puts nearly every test prompt into training as well, and the consistency score then mostly
measures memorised prompts. Here no prompt is on two sides.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from iqa.data import formats
from iqa.data.formats import parse_number, read_csv
from iqa.data.registry import DEFAULT_ROOTS, DataError, ReadContext
from iqa.data.splits import split_by_groups
from iqa.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from iqa.runtime import to_device

# The repository root (this file is iqa/clip/data.py): the demo lives in its .cache/, next to
# the image cache of both trainers.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CSV = DEFAULT_ROOTS['agiqa-3k'] / 'data.csv'
IMAGE_COLUMNS = ('name', 'image')     # AGIQA-3K calls it name; generic CSVs often image
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


@dataclass
class PromptDataset:
    """Images with their prompts and two scores, in CSV order."""
    csv_path: Path
    paths: list[str]
    prompts: list[str]
    mos_q: np.ndarray
    mos_c: np.ndarray
    explanations: list[str] | None
    lines: list[int]          # CSV line of each row, for messages

    def __len__(self):
        return len(self.paths)


def image_folders(csv_path):
    """Where a prompt CSV's images are looked for first: as data_loader's AGIQA-3K reader does,
    the AGIQA-3K/, images/ or image/ folder next to the CSV, or the CSV's own folder."""
    folder = Path(csv_path).parent
    return [folder / 'AGIQA-3K', folder / 'images', folder / 'image', folder]


def find_image_folder(csv_path, names, image_base_dir=None, check=True):
    """The folder of a prompt CSV's images, found by data_loader's rule, not guessed.

    Why: copies of AGIQA-3K nest their images differently (one known copy keeps them in
    ACGIQA-3K/). Without --image_base_dir the usual folders next to the CSV are tried,
    then the folders one level below, and the one used is printed; with it, that folder and
    the ones below it. If none holds the images, one DataError names the folders searched and
    --image_base_dir. check=False: no error, the first usual folder that exists."""
    csv_path = Path(csv_path)
    root = Path(image_base_dir) if image_base_dir else csv_path.parent
    expected = [root] if image_base_dir else image_folders(csv_path)
    ctx = ReadContext(name=csv_path.name, root=root, seed=0, score=None, train_ratio=0.8)
    hint = ('point --image_base_dir at the folder that holds them' if not image_base_dir else
            f'--image_base_dir {image_base_dir} does not hold them; point it at the folder that does')
    try:
        return formats.find_image_folder(ctx, names, expected, csv_path, hint=hint)
    except DataError:
        if check:
            raise
        return next((d for d in expected if d.is_dir()), expected[-1])


def read_prompt_csv(csv_path, image_base_dir=None, *, quality_column='mos_quality', align_column='mos_align',
                    explanation_column=None, image_column=None, check_images=True) -> PromptDataset:
    """Rows of an AGIQA-3K-style CSV. Other columns are ignored.

    Every problem raises DataError naming the file, the line and the column: a missing column,
    a non-numeric score, an empty prompt or explanation, an image file that does not exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f'{csv_path}: no such CSV file (--data_csv_path); expected columns name, prompt, '
                        f'{quality_column}, {align_column}')
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
        header = [h.strip() for h in (next(csv.reader(f), None) or [])]
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in header), 'name')
    required = [image_column, 'prompt', quality_column, align_column] + ([explanation_column] if explanation_column else [])
    header, rows = read_csv(csv_path, required)
    base = find_image_folder(csv_path, [r[image_column] for _, r in rows], image_base_dir, check_images)
    paths, prompts, mos_q, mos_c, explanations, lines, missing = [], [], [], [], [], [], []
    for line, r in rows:
        where = f'{csv_path} line {line}'
        if not r[image_column]:
            raise DataError(f'{where}, column {image_column!r}: empty image name')
        if not r['prompt']:
            raise DataError(f'{where}, column \'prompt\': empty prompt (image {r[image_column]}); '
                            'every image needs the prompt it was generated from')
        mos_q.append(parse_number(r[quality_column], f'{where}, column {quality_column!r}'))
        mos_c.append(parse_number(r[align_column], f'{where}, column {align_column!r}'))
        if explanation_column:
            if not r[explanation_column]:
                raise DataError(f'{where}, column {explanation_column!r}: empty explanation '
                                '(--use_explanations needs one for every row)')
            explanations.append(r[explanation_column])
        path = Path(r[image_column])
        path = path if path.is_absolute() else base / path
        if check_images and not path.is_file():
            missing.append(f'  line {line}: {path}')
        paths.append(str(path))
        prompts.append(r['prompt'])
        lines.append(line)
    if missing:
        raise DataError(f'{csv_path}: {len(missing)} of {len(rows)} images not found under {base} '
                        f'(--image_base_dir):\n' + '\n'.join(missing[:20]) +
                        (f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''))
    dup = len(paths) - len(set(paths))
    if dup:
        first = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise DataError(f'{csv_path}: image {first} is listed more than once')
    return PromptDataset(csv_path, paths, prompts, np.array(mos_q), np.array(mos_c),
                         explanations if explanation_column else None, lines)


def label_scale(values):
    """The original's automatic label scale: 5 when the column's maximum exceeds 1.5, else 1."""
    return 5.0 if float(np.max(values)) > 1.5 else 1.0


def prompt_split(prompts, seed, val_ratio=0.1, test_ratio=0.2):
    """{'train', 'val', 'test'} -> image indices, whole prompts on one side, seeded.

    The split is split_by_groups with the prompts as groups (the same split the
    Swin readers make of AGIQA-3K by prompt), so there is one split rule in the toolkit. That
    rule cuts test off first (train_ratio = 1 - test_ratio of the prompts) and then carves val
    out of the training side, so val_ratio is turned into its share of the training side:
    val_ratio / (1 - test_ratio), which keeps the proportions of the whole 70/10/20 by default."""
    n_units = len(set(map(str, prompts)))
    if n_units < 3:
        raise DataError(f'a train/val/test split by prompt needs at least 3 different prompts, found {n_units}')
    splits = split_by_groups(len(prompts), seed, train_ratio=1.0 - test_ratio,
                                         val_ratio=val_ratio / (1.0 - test_ratio), groups=prompts)
    if val_ratio > 0 and 'val' not in splits:
        raise DataError(f'{n_units} prompts are too few for val {val_ratio} / test {test_ratio}')
    return {k: v for k, v in splits.items() if len(v)}


def draw_split(dataset: PromptDataset, seed, val_ratio=0.1, test_ratio=0.2, split_file=None):
    """(splits, source): a run's train/val/test split, as train_clip.py draws it for a round with
    `seed` (the run's seed + round - 1) and as cross_dataset_test.py redraws it from a checkpoint.

    A --split_file wins over the seeded prompt split. Both sides of training must hold images."""
    if split_file:
        splits, source = read_split_file(split_file, dataset), f'--split_file {split_file}'
    else:
        splits = prompt_split(dataset.prompts, seed, val_ratio, test_ratio)
        source = f'random by prompt (seed {seed})'
    if 'train' not in splits or 'test' not in splits:
        raise DataError(f'split {source} has no train or no test images')
    return splits, source


# Absolute paths train_clip.py stores next to the flags as given: a relative --data_csv_path or
# --split_file means nothing once the working folder has changed, and 'demo' names a folder.
SPLIT_PATH_KEYS = ('data_csv_file', 'image_base_dir_abs', 'split_file_abs')


def split_paths(args):
    """{SPLIT_PATH_KEYS: absolute path or None} of train_clip.py's data flags."""
    csv_path = DEMO_ROOT / 'data.csv' if args.data_csv_path == 'demo' else Path(args.data_csv_path)
    absolute = lambda p: str(Path(p).expanduser().absolute()) if p else None  # noqa: E731
    return {'data_csv_file': absolute(csv_path), 'image_base_dir_abs': absolute(args.image_base_dir),
            'split_file_abs': absolute(args.split_file)}


def read_split_file(path, dataset: PromptDataset):
    """A published split: JSON {"train": [image names], "val": [...], "test": [...]} (names as in the
    CSV's image column, or file names) or a CSV with columns name,split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'--split_file {path}: no such file')
    if path.suffix.lower() == '.json':
        try:
            spec = json.loads(path.read_text(encoding='utf-8'))
        except json.JSONDecodeError as err:
            raise DataError(f'--split_file {path}: not valid JSON ({err})') from None
        if not isinstance(spec, dict):
            raise DataError(f'--split_file {path}: expected an object {{"train": [...], "test": [...]}}')
        assign = {str(name): side for side, names in spec.items() for name in names}
    else:
        _, rows = read_csv(path, ['name', 'split'])
        assign = {r['name']: r['split'].lower() for _, r in rows}
    by_name = {}
    for i, p in enumerate(dataset.paths):
        by_name[os.path.basename(p)] = i
    splits = {'train': [], 'val': [], 'test': []}
    for name, side in assign.items():
        if side not in splits:
            raise DataError(f'--split_file {path}: unknown split {side!r} for {name} (expected train, val, test)')
        i = by_name.get(os.path.basename(name))
        if i is None:
            raise DataError(f'--split_file {path}: image {name} is not in {dataset.csv_path}')
        splits[side].append(i)
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in splits.items() if v}


def shared_prompts(splits, prompts):
    """Prompts found on more than one side of a split (empty for our own prompt split)."""
    sets = {k: {prompts[i] for i in v} for k, v in splits.items()}
    names = list(sets)
    return sorted({p for a in names for b in names if a < b for p in sets[a] & sets[b]})


def train_cache_size(model_size, paths):
    """Side of the square cache training crops are cut from: the images' median short side, kept
    within [model_size, 2 * model_size].

    The original cut RandomResizedCrop(224, scale=(0.8, 1.0)) from the full image, so a crop of
    80-100% of the area was downsampled to 224. A crop of a cache at the model's size would be
    upsampled instead (blurred); at twice the model's size every crop is downsampled, as in the
    original. Images no larger than the model's input (the 64-pixel demo for the 64-pixel nano)
    gain nothing from a larger cache: the training images are then the evaluation images. Only
    the file headers are read."""
    shorts = []
    for path in paths:
        with Image.open(path) as im:
            shorts.append(min(im.size))
    return int(min(2 * model_size, max(model_size, np.median(shorts))))


def clip_pixels(images_u8, train=False, generator=None, scale=(0.8, 1.0), size=None):
    """uint8 (B, 3, C, C) -> CLIP-normalised float (B, 3, S, S), S = size (default C).

    Training: a random crop covering `scale` of the area with aspect ratio 3/4-4/3, resized
    to S x S, and a random horizontal flip, like the original's RandomResizedCrop(224,
    scale=(0.8, 1.0)) + RandomHorizontalFlip, cut from the cached C x C image in one batched
    roi_align call instead of per image with PIL; with C = 2 S (train_cache_size) the crop is
    downsampled, as the original's was from the full image (2 x 2 bilinear samples per output
    pixel). Evaluation: the cached image as it is (the original's Resize((224, 224)) of the
    whole image, done once by the cache)."""
    x = images_u8.float().div_(255)
    if train:
        from torchvision.ops import roi_align
        b, _, h, w = x.shape
        out_hw = (h, w) if size is None else (size, size)
        g = generator
        area = torch.empty(b).uniform_(*scale, generator=g)
        ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
        cw = torch.sqrt(area * ratio).clamp(max=1.0) * w
        ch = torch.sqrt(area / ratio).clamp(max=1.0) * h
        x0 = torch.rand(b, generator=g) * (w - cw)
        y0 = torch.rand(b, generator=g) * (h - ch)
        boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
        x = roi_align(x, to_device(boxes, x.device), output_size=out_hw, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = to_device(torch.rand(b, generator=g) < 0.5, x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    elif size is not None and x.shape[-1] != size:
        raise ValueError(f'evaluation images are {x.shape[-1]} px, the model takes {size}: cache them at its size')
    mean, std = _normalisation(x.device)
    return (x - mean) / std


_NORMALISATION = {}


def _normalisation(device):
    """CLIP_MEAN and CLIP_STD on `device`, copied there once per process, not at every batch."""
    if device not in _NORMALISATION:
        _NORMALISATION[device] = (CLIP_MEAN.to(device), CLIP_STD.to(device))
    return _NORMALISATION[device]


# ----------------------------------------------------------------------------------------
# Built-in demo: AIGC-style images whose prompts describe them (or deliberately do not)
# ----------------------------------------------------------------------------------------

DEMO_VERSION = 9
DEMO_ROOT = REPO_ROOT / '.cache' / 'demo-clip'
DEMO_SIZE = 64
DEMO_COLORS = {'red': (220, 30, 30), 'green': (40, 180, 50), 'blue': (40, 70, 220), 'yellow': (235, 220, 40),
               'orange': (245, 140, 20), 'purple': (140, 50, 170), 'brown': (125, 75, 30), 'gray': (128, 128, 128)}
DEMO_SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond')
DEMO_OBJECT_SIZES = {'small': (0.13, 0.19), 'large': (0.30, 0.40)}   # radius as a share of the side
# no gray background: an under-exposed white one must not look like another background
DEMO_BACKGROUNDS = {'white': (235, 235, 235), 'black': (20, 20, 20), 'pink': (250, 170, 200),
                    'cyan': (140, 225, 230)}
DEMO_IMAGES_PER_PROMPT = 4   # at most 5: each image of a prompt matches a different number of attributes
DEMO_DISTORTIONS = ('dark',)


def _demo_prompt(size, color, shape, background):
    return f'a {size} {color} {shape} on a {background} background'


def _draw_demo(size, color, shape, background, rng):
    im = Image.new('RGB', (DEMO_SIZE, DEMO_SIZE), DEMO_BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    r = rng.uniform(*DEMO_OBJECT_SIZES[size]) * DEMO_SIZE
    cx, cy = rng.uniform(r, DEMO_SIZE - r, size=2)
    fill = DEMO_COLORS[color]
    if shape == 'circle':
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 'square':
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 'diamond':
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == 'triangle':
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    return im


def _degrade(im, level, kind, rng):
    """Quality level 0 (clean) .. 4 (worst): haze, under-exposure or noise. The first two change
    the colour statistics a random-initialised tower picks up within minutes on a CPU; all three
    leave the colours and the shape recognisable, so the prompt still can be checked."""
    if level == 0:
        return im
    a = np.asarray(im, dtype=np.float32)
    if kind == 'haze':
        a = a * (1 - 0.15 * level) + 150.0 * 0.15 * level
    elif kind == 'dark':
        a = a * (1 - 0.11 * level)   # at most 0.56: colours stay recognisable
    else:
        a = a + rng.normal(0, 10.0 * level, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def ensure_clip_demo(root=None, seed=0):
    """Write the demo set once (1280 small PNGs and data.csv); return its data.csv path.

    Each of the 320 prompts 'a <size> <color> <shape> on a <background> background' gets four
    images. An image matches 0-4 of the prompt's four attributes (the others are drawn with a
    different value; the four images of one prompt match different numbers of them), and
    mos_align grows with the matches; mos_quality falls with the level of under-exposure. Both
    scores get a little rater noise. No download: everything is drawn here. Many prompts, few
    images each: a model must learn the words, not memorise the prompts. `seed` draws another
    set of images and scores for the same prompts (give it its own `root`: a folder is written
    once and then reused whatever the seed), data a model tuned on seed 0 never saw.
    """
    root = Path(root) if root else DEMO_ROOT
    if _demo_is_current(root):
        return root / 'data.csv'
    if root.exists() and any(root.iterdir()) and not (root / 'demo_info.json').exists():
        raise DataError(f'{root} exists and is not a demo folder (no demo_info.json); give an empty or new folder')
    # Written to a private folder and renamed into place: two runs starting at once never see
    # half a data set, and an older demo version is replaced whole.
    tmp = root.parent / f'.{root.name}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    _write_demo(tmp, seed)
    if _demo_is_current(root):          # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root / 'data.csv'
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / 'data.csv'


def _demo_is_current(root):
    try:
        return json.loads((root / 'demo_info.json').read_text()).get('version') == DEMO_VERSION
    except (OSError, ValueError):
        return False


def _write_demo(root, seed):
    (root / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, colors, backgrounds = list(DEMO_OBJECT_SIZES), list(DEMO_COLORS), list(DEMO_BACKGROUNDS)
    rows = []
    for size, color, shape, background in itertools.product(sizes, colors, DEMO_SHAPES, backgrounds):
        prompt = _demo_prompt(size, color, shape, background)
        # The images of one prompt match different numbers of its attributes (0-4, drawn without
        # replacement): within every prompt the label changes with the image, so the text has to
        # be read word by word rather than memorised as a whole.
        match_counts = rng.permutation(5)
        for k in range(DEMO_IMAGES_PER_PROMPT):
            matches = int(match_counts[k])
            keep = set(rng.choice(4, size=matches, replace=False).tolist())
            z = size if 0 in keep else next(x for x in sizes if x != size)
            c = color if 1 in keep else rng.choice([x for x in colors if x != color])
            s = shape if 2 in keep else rng.choice([x for x in DEMO_SHAPES if x != shape])
            b = background if 3 in keep else rng.choice([x for x in backgrounds if x != background])
            level = int(rng.integers(0, 5))
            im = _degrade(_draw_demo(z, c, s, b, rng), level, rng.choice(DEMO_DISTORTIONS), rng)
            name = f'images/{size}_{color}_{shape}_{background}_{k}.png'
            buf = io.BytesIO()
            im.save(buf, format='PNG')
            atomic_write_bytes(root / name, buf.getvalue())
            mos_q = float(np.clip(4.6 - 0.9 * level + rng.normal(0, 0.15), 0, 5))
            mos_c = float(np.clip(1.0 + 1.0 * matches + rng.normal(0, 0.15), 0, 5))
            rows.append([name, prompt, f'{mos_q:.3f}', f'{mos_c:.3f}',
                         f'{"matches" if matches == 4 else "differs from"} the prompt'])
    text = 'name,prompt,mos_quality,mos_align,explanation\n' + ''.join(
        ','.join(f'"{v}"' if ',' in v or ' ' in v else v for v in r) + '\n' for r in rows)
    atomic_write_text(root / 'data.csv', text)
    atomic_write_json(root / 'demo_info.json', {'version': DEMO_VERSION, 'images': len(rows)})
