"""Writers of tiny data sets in the exact on-disk formats of the real ones.

Used by tests/test_data_loader.py: each function writes a folder the way the real data set
ships it (file names, columns, .mat variables, .xlsx sheets), with a handful of small images.
"""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, hw=(40, 48), seed: int = 0, mode: str = 'RGB', fmt: str | None = None) -> Path:
    """A small random image; `mode` picks the PIL mode it is saved in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(hw[0], hw[1], 3), dtype=np.uint8)
    im = Image.fromarray(arr, 'RGB')
    if mode != 'RGB':
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], quote_all: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC if quote_all else csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (gray, RGB or RGBA) written by hand: Pillow cannot write 16-bit colour."""
    if array.ndim == 2:
        array = array[..., None]
    h, w, c = array.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b''.join(b'\x00' + array[y].astype('>u2').tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack('>IIBBBBB', w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                     + chunk(b'IEND', b''))
    return path


KONIQ_VOTES = ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD']


def make_koniq(root: Path, sets=('training',) * 6 + ('validation',) * 2 + ('test',) * 3,
               scores_file=True, sets_file=True, image_dir='1024x768', hw=(40, 48)) -> list[str]:
    """KonIQ-10k: koniq10k_scores_and_distributions.csv (MOS 1-5, MOS_zscore 0-100) and
    koniq10k_distributions_sets.csv ('set' column), quoted like the real files."""
    names = [f'{1000 + i}.jpg' for i in range(len(sets))]
    rows_scores, rows_sets = [], []
    for i, (name, split) in enumerate(zip(names, sets)):
        mos = 1.5 + 3.0 * i / len(names)
        zscore = (mos - 1) * 25
        rows_scores.append([name, 1, 2, 3, 4, 5, 15, round(mos, 4), 0.5, round(zscore, 4)])
        rows_sets.append([name, 1, 2, 3, 4, 5, 15, round(zscore, 4), 12.5, split])
        if image_dir:
            write_image(root / image_dir / name, hw, seed=i, fmt='JPEG')
    if scores_file:
        write_csv(root / 'koniq10k_scores_and_distributions.csv', KONIQ_VOTES + ['MOS_zscore'], rows_scores,
                  quote_all=True)
    if sets_file:
        write_csv(root / 'koniq10k_distributions_sets.csv', KONIQ_VOTES + ['set'], rows_sets, quote_all=True)
    return names


def make_koniq_user_json(root: Path, n_train=5, n_test=3) -> None:
    """The user's KonIQ layout: koniq_train.json / koniq_test.json with "koniq_train/x.jpg"
    entries and the images in train/ and test/ (their notes)."""
    names = make_koniq(root, sets=('training',) * (n_train + n_test), sets_file=False, image_dir=None)
    for side, part in (('train', names[:n_train]), ('test', names[n_train:])):
        entries = [{'image': f'koniq_{side}/{n}', 'score': 50.0 + k} for k, n in enumerate(part)]
        (root / f'koniq_{side}.json').write_text(json.dumps(entries))
        for k, n in enumerate(part):
            write_image(root / side / n, seed=k, fmt='JPEG')


def make_json_list(folder: Path, json_name: str, n=4, spelling=('image', 'score'), score_as_str=False,
                   prefix='') -> Path:
    """The user's cross-dataset lists: [{"image": ..., "score": ...}] with images beside the JSON."""
    key_image, key_score = spelling
    entries = []
    for i in range(n):
        name = f'img_{i}.png'
        write_image(folder / name, seed=i)
        score = 1.0 + i
        entries.append({key_image: prefix + name, key_score: str(score) if score_as_str else score})
    path = folder / json_name
    path.write_text(json.dumps(entries))
    return path


def make_spaq(root: Path, n=6) -> None:
    """SPAQ: Annotations/MOS and Image attribute scores.xlsx with images in TestImage/."""
    import openpyxl
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(['Image name', 'MOS', 'Brightness', 'Colorfulness', 'Contrast', 'Noisiness', 'Sharpness'])
    for i in range(n):
        name = f'{i + 1:05d}.jpg'
        ws.append([name, 10.0 + 10 * i, 50, 50, 50, 50, 40.0 + i])
        write_image(root / 'TestImage' / name, seed=i, fmt='JPEG')
    (root / 'Annotations').mkdir(parents=True, exist_ok=True)
    wb.save(root / 'Annotations' / 'MOS and Image attribute scores.xlsx')


def make_kadid(root: Path, refs=(1, 2, 65, 66, 70, 81), per_ref=2) -> None:
    """KADID-10k: dmos.csv (dist_img, ref_img, dmos, var) with images in images/."""
    rows = []
    for r in refs:
        for d in range(1, per_ref + 1):
            name = f'I{r:02d}_{d:02d}_01.png'
            rows.append([name, f'I{r:02d}.png', round(1 + 4 * d / (per_ref + 1), 3), 0.5])
            write_image(root / 'images' / name, seed=r * 10 + d)
    write_csv(root / 'dmos.csv', ['dist_img', 'ref_img', 'dmos', 'var'], rows)


def make_agiqa(root: Path, prompts=5, per_prompt=2) -> None:
    """AGIQA-3K: data.csv (name, prompt, adj1, adj2, style, mos_quality, std_quality,
    mos_align, std_align)."""
    rows = []
    for p in range(prompts):
        for m in range(per_prompt):
            name = f'model{m}_prompt{p}.jpg'
            rows.append([name, f'a photo of thing {p}', 'red', '', 'photo', 1.0 + p * 0.5 + m * 0.1, 0.3,
                         4.0 - p * 0.3, 0.2])
            write_image(root / name, seed=p * 10 + m, fmt='JPEG')
    write_csv(root / 'data.csv', ['name', 'prompt', 'adj1', 'adj2', 'style', 'mos_quality', 'std_quality',
                                  'mos_align', 'std_align'], rows)


def make_livec(root: Path, n=12) -> list[str]:
    """LIVE Challenge: Data/AllImages_release.mat (cell array of names, first 7 are the
    raters' training images) and Data/AllMOS_release.mat (1 x N) with Images/."""
    import scipy.io
    names = [f't{i}.bmp' if i < 7 else f'{i}.bmp' for i in range(n)]
    cells = np.empty((n, 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = np.array([name])
        if i >= 7:
            write_image(root / 'Images' / name, seed=i, fmt='BMP')
    (root / 'Data').mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / 'Data' / 'AllImages_release.mat', {'AllImages_release': cells})
    scipy.io.savemat(root / 'Data' / 'AllMOS_release.mat',
                     {'AllMOS_release': np.arange(n, dtype=np.float64).reshape(1, n) * 5})
    return names


LIVE_FOLDERS = (('jp2k', 227), ('jpeg', 233), ('wn', 174), ('gblur', 174), ('fastfading', 174))


def make_live(root: Path, refs=('a.bmp', 'b.bmp', 'c.bmp', 'd.bmp', 'e.bmp'), per_ref=2) -> None:
    """LIVE release 2: dmos_realigned.mat (dmos_new, orgs over all 982 entries) and
    refnames_all.mat; only the few entries not marked in `orgs` get an image file."""
    import scipy.io
    total = sum(c for _, c in LIVE_FOLDERS)
    orgs = np.ones((1, total))
    dmos = np.zeros((1, total))
    refnames = np.empty((1, total), dtype=object)
    refnames[0, :] = np.array(['a.bmp'])
    files = [(folder, k) for folder, count in LIVE_FOLDERS for k in range(1, count + 1)]
    for r, ref in enumerate(refs):
        for d in range(per_ref):
            # spread the real images over the five folders
            index = (r * per_ref + d) * 97 % total
            folder, k = files[index]
            orgs[0, index] = 0
            dmos[0, index] = 20 + 10 * d + r
            refnames[0, index] = np.array([ref])
            write_image(root / folder / f'img{k}.bmp', seed=index, fmt='BMP')
    scipy.io.savemat(root / 'dmos_realigned.mat', {'dmos_new': dmos, 'orgs': orgs})
    scipy.io.savemat(root / 'refnames_all.mat', {'refnames_all': refnames})


def make_csiq(root: Path, refs=('1600', 'aerial_city', 'boston', 'bridge', 'butter_flower'), per_ref=2) -> None:
    """CSIQ as HyperIQA reads it: csiq_label.txt lines '<name> <DMOS>', images in dst_imgs_all/."""
    lines = []
    for r in refs:
        for d in range(1, per_ref + 1):
            name = f'{r}.AWGN.{d}.png'
            lines.append(f'{name} {0.1 * d:.4f}')
            write_image(root / 'dst_imgs_all' / name, seed=len(lines))
    (root / 'csiq_label.txt').write_text('\n'.join(lines) + '\n')


def make_tid2013(root: Path, refs=(1, 2, 3, 4, 25), per_ref=2) -> None:
    """TID2013 as HyperIQA reads it: mos_with_names.txt lines '<MOS> <name>', images in distorted_images/."""
    lines = []
    for r in refs:
        for d in range(1, per_ref + 1):
            name = f'i{r:02d}_01_{d}.bmp'
            lines.append(f'{5.0 - d * 0.5:.5f} {name}')
            write_image(root / 'distorted_images' / name, seed=len(lines), fmt='BMP')
    (root / 'mos_with_names.txt').write_text('\n'.join(lines) + '\n')


def make_bid(root: Path, n=6) -> None:
    """BID: DatabaseGrades.xlsx (image number, MOS) with DatabaseImage####.JPG in the root."""
    import openpyxl
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(['Image Number', 'Average Grade'])
    for i in range(1, n + 1):
        ws.append([i, 0.5 + 0.7 * i])
        write_image(root / f'DatabaseImage{i:04d}.JPG', seed=i, fmt='JPEG')
    root.mkdir(parents=True, exist_ok=True)
    wb.save(root / 'DatabaseGrades.xlsx')
