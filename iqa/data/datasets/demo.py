"""The built-in demo data set: generated on first use (no download), read as KonIQ-10k.

It gives the demo commands and the tests a real data set in the KonIQ layout with disjoint
reference images in training / validation / test, so every code path runs without data.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from iqa.data.datasets.koniq import KONIQ_SCORES, KONIQ_SETS, read_koniq
from iqa.data.image_cache import to_rgb
from iqa.data.patches import GRAY_WEIGHTS
from iqa.data.registry import DEFAULT_ROOTS, SCRIPT_DIR, DataError, DatasetRecord, register
from iqa.files import atomic_write_bytes

DEMO_VERSION = 3
DEMO_SIZE = (384, 512)      # (H, W) stored: KonIQ's 4:3 landscape at half of 1024x768
DEMO_JPEG_QUALITY = 92      # storage quality; the 'jpeg' distortion goes far below it
# Reference images: scikit-image's bundled sample photos (files in skimage/data, no download)
# and procedural images; the split is fixed and by reference, so no content is on both sides.
DEMO_REFERENCES = (
    ('astronaut', 'astronaut.png', 'training'), ('grass', 'grass.png', 'training'),
    ('motorcycle', 'motorcycle_left.png', 'training'), ('hubble', 'hubble_deep_field.jpg', 'training'),
    ('retina', 'retina.jpg', 'training'), ('ihc', 'ihc.png', 'training'),
    ('brick', 'brick.png', 'training'), ('coins', 'coins.png', 'training'),
    ('shapes1', 'procedural', 'training'), ('clouds1', 'procedural', 'training'),
    ('rocket', 'rocket.jpg', 'validation'), ('coffee', 'coffee.png', 'validation'),
    ('shapes2', 'procedural', 'validation'),
    ('chelsea', 'chelsea.png', 'test'), ('camera', 'camera.png', 'test'),
    ('clouds2', 'procedural', 'test'),
)
# Three distortion kinds at five levels; level k of every kind gets the same score, a single
# perceptual scale from 'barely visible' to 'very strong'. They are kinds a randomly
# initialised model learns within CPU minutes from ten training references; blur and JPEG are
# not (how blurred or blocky an unseen picture is depends on its content: within-kind test
# SRCC about 0.3 and 0.0 after 600-1000 steps), nor over-exposure (about 0.65).
DEMO_DISTORTIONS = {
    'noise': (8.0, 15.0, 25.0, 38.0, 56.0),          # white noise standard deviation (0-255)
    'haze': (0.2, 0.35, 0.5, 0.65, 0.8),             # weight of a blend towards light gray (200)
    'underexposure': (0.7, 0.5, 0.35, 0.25, 0.15),   # factor on all pixel values
}
DEMO_LUMA_MEAN_STD = (120.0, 55.0)   # every reference is brought to this mean / std of gray level
DEMO_LEVEL_SCORES = (90.0, 76.0, 63.0, 50.0, 36.0, 22.0)   # MOS_zscore of levels 0 (pristine) to 5
DEMO_SCORE_NOISE = 2.0     # rater disagreement added to each score (seeded)
DEMO_INFO = 'demo_info.json'


def ensure_demo_dataset(root: str | os.PathLike | None = None) -> Path:
    """Generate the built-in demo data set once (no download) and return its folder.

    KonIQ layout, read by the KonIQ reader: koniq10k_scores_and_distributions.csv,
    koniq10k_distributions_sets.csv (training / validation / test with disjoint reference
    images) and 512x384 JPEGs in 1024x768/ (the folder name the reader expects; the images
    are stored at half size to stay small). 16 references (scikit-image's bundled photos plus
    procedural images) x (pristine + 3 distortions x 5 levels) = 256 images, ~13 MB, about
    2 seconds to generate. Written to a temporary folder and renamed into place, so a crash or
    a concurrent run never leaves a half-written data set.
    """
    root = Path(root).expanduser().absolute() if root is not None else DEFAULT_ROOTS['demo']
    info_file = root / DEMO_INFO
    if _demo_is_current(info_file):
        return root
    if root.exists():
        if info_file.is_file() or (root.is_dir() and not any(root.iterdir())):
            shutil.rmtree(root)   # an older demo version (or an empty folder): regenerate
        else:
            raise DataError(f'{root} exists but is not a demo data set (no {DEMO_INFO}); '
                            f'remove it or give another folder for the demo data set')
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f'.{root.name}.tmp-{os.getpid()}-{threading.get_ident()}'
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        _write_demo(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _demo_is_current(info_file):   # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'demo data set generated in {root} in {time.perf_counter() - started:.1f} s', flush=True)
    return root


def _demo_is_current(info_file: Path) -> bool:
    try:
        return json.loads(info_file.read_text()).get('version') == DEMO_VERSION
    except (OSError, ValueError):
        return False


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _skimage_data_dir() -> Path | None:
    """skimage/data inside the installed wheel, found without importing skimage."""
    spec = importlib.util.find_spec('skimage')
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / 'data'
    return folder if folder.is_dir() else None


def _fit_demo_size(im: Image.Image) -> Image.Image:
    """Centre-crop to 4:3, resize to DEMO_SIZE and normalize the exposure.

    The references differ widely in brightness and contrast (the Hubble deep field is nearly
    black); bringing them all to one mean and spread of gray level leaves the exposure
    distortions as the only source of global photometric change, so their scores are
    learnable from any patch.
    """
    h, w = DEMO_SIZE
    im = to_rgb(im)
    scale = min(im.width / w, im.height / h)
    cw, ch = round(w * scale), round(h * scale)
    x0, y0 = (im.width - cw) // 2, (im.height - ch) // 2
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float64)
    luma = arr @ GRAY_WEIGHTS
    mean, std = DEMO_LUMA_MEAN_STD
    arr = (arr - luma.mean()) * (std / max(luma.std(), 1.0)) + mean
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'RGB')


def _procedural_reference(kind: str, seed: int) -> Image.Image:
    """A synthetic scene with sharp edges, smooth areas and texture, so every distortion shows."""
    rng = np.random.default_rng(seed)
    h, w = DEMO_SIZE
    if kind.startswith('clouds'):
        # 1/f noise (natural-image spectrum) mapped through a random colour matrix.
        fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing='ij')
        falloff = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** 1.6
        fields = [np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((h, w))) * falloff)) for _ in range(2)]
        fields = [(f - f.mean()) / f.std() for f in fields]
        colours = rng.uniform(-60, 60, size=(2, 3))
        base = rng.uniform(90, 170, size=3)
        arr = base + fields[0][..., None] * colours[0] + fields[1][..., None] * colours[1]
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
        n_shapes = 12
    else:
        # Smooth two-colour gradient background.
        c0, c1 = rng.uniform(30, 225, size=(2, 3))
        t = np.linspace(0, 1, w)[None, :, None] * 0.6 + np.linspace(0, 1, h)[:, None, None] * 0.4
        arr = c0 * (1 - t) + c1 * t
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
        n_shapes = 45
    draw = ImageDraw.Draw(im)
    for _ in range(n_shapes):
        x0, y0 = rng.uniform(-40, w), rng.uniform(-40, h)
        sx, sy = rng.uniform(15, 140, size=2)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        outline = tuple(int(v) for v in rng.integers(0, 256, size=3))
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + sx, y0 + sy], fill=fill, outline=outline, width=2)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + sx, y0 + sy], fill=fill, outline=outline, width=2)
        elif shape == 2:
            pts = [(x0 + rng.uniform(0, sx), y0 + rng.uniform(0, sy)) for _ in range(3)]
            draw.polygon(pts, fill=fill, outline=outline)
        else:
            for k in range(int(rng.integers(4, 12))):  # stripes: fine detail for blur to remove
                xs = x0 + k * 5
                draw.line([xs, y0, xs + sx / 3, y0 + sy], fill=fill, width=2)
    return im


def _distort(im: Image.Image, kind: str, value, rng: np.random.Generator) -> Image.Image:
    if kind == 'blur':
        return im.filter(ImageFilter.GaussianBlur(radius=value))
    if kind == 'jpeg':
        buf = io.BytesIO()
        im.save(buf, format='JPEG', quality=int(value))
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert('RGB')
    arr = np.asarray(im, dtype=np.float64)
    if kind == 'noise':
        arr = arr + rng.normal(0.0, value, size=arr.shape)
    elif kind == 'haze':
        arr = arr * (1.0 - value) + 200.0 * value
    elif kind == 'underexposure':
        arr = arr * value
    else:
        raise ValueError(f'unknown demo distortion {kind!r}')
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'RGB')


def _vote_counts(mos_1_5: float, rng: np.random.Generator, total: int = 100) -> list[int]:
    """KonIQ-style rating counts c1..c5 around a 1-5 MOS (discretized normal, sd 0.6)."""
    grid = np.arange(1, 6)
    weights = np.exp(-0.5 * ((grid - mos_1_5) / 0.6) ** 2) + 1e-3
    counts = rng.multinomial(total, weights / weights.sum())
    return [int(c) for c in counts]


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    """KonIQ's CSV style: strings quoted, numbers bare."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def _write_demo(folder: Path) -> None:
    image_dir = folder / '1024x768'
    image_dir.mkdir(parents=True)
    photos = _skimage_data_dir()
    rng = np.random.default_rng(2024)
    rows = []          # (image_name, counts, MOS, SD, MOS_zscore, set)
    references = []
    for ref_no, (ref, source, split) in enumerate(DEMO_REFERENCES):
        if source != 'procedural' and photos is not None and (photos / source).is_file():
            with Image.open(photos / source) as im:
                pristine = _fit_demo_size(im)
            origin = f'skimage/data/{source}'
        else:
            # No scikit-image (or a file missing from it): a procedural image takes its place.
            pristine = _procedural_reference(ref if source == 'procedural' else 'shapes', 1000 + ref_no)
            origin = 'procedural'
        references.append({'reference': ref, 'origin': origin, 'set': split})
        variants = [(f'{ref}_pristine.jpg', pristine, 0)]
        for kind, values in DEMO_DISTORTIONS.items():
            for level, value in enumerate(values, start=1):
                variants.append((f'{ref}_{kind}{level}.jpg', _distort(pristine, kind, value, rng), level))
        for name, im, level in variants:
            buf = io.BytesIO()
            im.save(buf, format='JPEG', quality=DEMO_JPEG_QUALITY)
            _write_bytes(image_dir / name, buf.getvalue())
            zscore = float(np.clip(DEMO_LEVEL_SCORES[level] + rng.normal(0.0, DEMO_SCORE_NOISE), 0, 100))
            counts = _vote_counts(1.0 + 4.0 * zscore / 100.0, rng)
            votes = np.repeat(np.arange(1, 6), counts)
            rows.append((name, counts, float(votes.mean()), float(votes.std()), zscore, split))

    votes_columns = ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD']
    scores = [[name, *counts, sum(counts), round(mos, 4), round(sd, 4), round(z, 4)]
              for name, counts, mos, sd, z, _ in rows]
    # As in the real sets file, MOS there is on the 0-100 scale (SD too).
    sets = [[name, *counts, sum(counts), round(z, 4), round(25 * sd, 4), split]
            for name, counts, mos, sd, z, split in rows]
    _write_bytes(folder / KONIQ_SCORES, _csv_bytes(votes_columns + ['MOS_zscore'], scores))
    _write_bytes(folder / KONIQ_SETS, _csv_bytes(votes_columns + ['set'], sets))
    info = {
        'version': DEMO_VERSION, 'generator': 'data_loader.ensure_demo_dataset',
        'layout': 'KonIQ-10k', 'image_size_hw': DEMO_SIZE, 'jpeg_quality': DEMO_JPEG_QUALITY,
        'reference_gray_mean_std': DEMO_LUMA_MEAN_STD,
        'score': 'MOS_zscore 0-100, higher is better; level k of every distortion scores '
                 f'{list(DEMO_LEVEL_SCORES)}[k] + N(0, {DEMO_SCORE_NOISE})',
        'distortions': {k: list(v) for k, v in DEMO_DISTORTIONS.items()},
        'references': references, 'images': len(rows),
    }
    _write_bytes(folder / DEMO_INFO, json.dumps(info, indent=2).encode())  # written last: marks completion


RECORD = register(DatasetRecord(
    name='demo', default_root=SCRIPT_DIR / '.cache' / 'demo-koniq',
    layout='the generated demo data set (ensure_demo_dataset)', reader=read_koniq, prepare=ensure_demo_dataset))
