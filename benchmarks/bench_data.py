"""Data pipeline benchmark: batched patch sampling vs the user's per-sample pipeline.

Measures, in one run on the same images:
  1. cache build (decode + resize of JPEGs in threads) and cache load (second call);
  2. training patches/s of data_loader.TrainPatchSampler, without and with colour jitter;
  3. the same for the naive per-sample pipeline the issue compares against: cached resized PIL
     image -> RandomCrop -> RandomHorizontalFlip -> [ColorJitter] -> ToTensor -> Normalize per
     sample, batched by a DataLoader with num_workers=0;
  4. for reference, the user's original KonIQ pipeline, which also decoded and resized the
     JPEG for every patch (not part of the speedup line).
Each pipeline is timed --repeats times, alternating with the other so both see the same
machine load (the 2-core CPU this was written on is shared), and the best run of each is
compared; medians are printed too. It ends with one line:
`data pipeline speedup: A.Ax (no jitter), B.Bx (jitter)`.

    python benchmarks/bench_data.py                       # defaults: 32 images, 2048 patches
    python benchmarks/bench_data.py --images 8 --patches 64 --repeats 1   # smoke run (tests)
    python benchmarks/bench_data.py --device cuda         # sampler on a GPU (naive stays on CPU)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data_loader  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def write_jpegs(folder: Path, n: int, seed: int) -> list[str]:
    """KonIQ-sized (1024x768) JPEGs of smooth random colour fields plus noise texture."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((1024, 768), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-20, 21, size=(768, 1024, 3))
        path = folder / f'bench_{i:04d}.jpg'
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def naive_patches_per_s(pil_images, mos, args, color_jitter: bool) -> float:
    """The user's pipeline: per-sample PIL transforms through a DataLoader (num_workers=0)."""
    steps = [transforms.RandomCrop(args.patch_size), transforms.RandomHorizontalFlip()]
    if color_jitter:
        steps.append(transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05))
    steps += [transforms.ToTensor(), transforms.Normalize(data_loader.IMAGENET_MEAN, data_loader.IMAGENET_STD)]
    transform = transforms.Compose(steps)

    class PatchDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.samples = [(i, float(m)) for i, m in enumerate(mos) for _ in range(args.patch_num)]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, k):
            i, score = self.samples[k]
            return transform(pil_images[i]), score

    torch.manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(PatchDataset(), batch_size=args.batch_size, shuffle=True, num_workers=0)
    return _time_batches(lambda: (b[0] for b in loader), args)


def original_patches_per_s(paths, mos, args) -> float:
    """The user's original loader: pil_loader(path) + Resize + crop + flip + jitter per patch."""
    transform = transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.Resize(tuple(args.resize)),
        transforms.RandomCrop(args.patch_size),
        transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05), transforms.ToTensor(),
        transforms.Normalize(data_loader.IMAGENET_MEAN, data_loader.IMAGENET_STD)])

    class OriginalDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths) * args.patch_num

        def __getitem__(self, k):
            with open(paths[k % len(paths)], 'rb') as f:
                image = Image.open(f).convert('RGB')
            return transform(image), float(mos[k % len(paths)])

    loader = torch.utils.data.DataLoader(OriginalDataset(), batch_size=args.batch_size, shuffle=True,
                                         num_workers=0)
    quick = argparse.Namespace(**{**vars(args), 'patches': min(args.patches, 4 * args.batch_size)})
    return _time_batches(lambda: (b[0] for b in loader), quick)


def sampler_patches_per_s(images, mos, args, color_jitter: bool) -> float:
    sampler = data_loader.TrainPatchSampler(images, mos, patch_size=args.patch_size,
                                            patch_num=args.patch_num, batch_size=args.batch_size,
                                            color_jitter=color_jitter, seed=args.seed, device=args.device)
    epoch = iter(range(10**9))
    return _time_batches(lambda: (b[0] for b in sampler.batches(next(epoch))), args)


def _time_batches(new_epoch, args) -> float:
    """Patches/s over at least args.patches patches, after one warm-up batch."""
    batches = new_epoch()
    next(batches)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    sync()
    done, start = 0, time.perf_counter()
    while done < args.patches:
        for patches in batches:
            done += patches.shape[0]
            if done >= args.patches:
                break
        else:
            batches = new_epoch()
    sync()
    return done / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=32, metavar='N',
                        help='number of 1024x768 JPEGs (default: 32)')
    parser.add_argument('--patches', type=int, default=2048, metavar='N',
                        help='patches timed per pipeline (default: 2048)')
    parser.add_argument('--batch_size', type=int, default=32, metavar='N', help='batch size (default: 32)')
    parser.add_argument('--patch_size', type=int, default=224, metavar='P', help='patch size (default: 224)')
    parser.add_argument('--patch_num', type=int, default=25, metavar='N', help='patches per image (default: 25)')
    parser.add_argument('--resize', type=int, nargs=2, default=(512, 384), metavar=('H', 'W'),
                        help='decode-once resize, height width (default: 512 384)')
    parser.add_argument('--device', default='cpu', help='device of the batched sampler (default: cpu)')
    parser.add_argument('--repeats', type=int, default=5, metavar='N',
                        help='timed runs per pipeline, best one counts (default: 5)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    args = parser.parse_args(argv)

    print(f'machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}')
    print(f'versions: python {platform.python_version()}, torch {torch.__version__}, '
          f'torchvision {torchvision.__version__}, numpy {np.__version__}, pillow {Image.__version__}')
    print(f'command: python benchmarks/bench_data.py {" ".join(sys.argv[1:] if argv is None else argv)}')
    print(f'date: {time.strftime("%Y-%m-%d %H:%M:%S")}')

    with tempfile.TemporaryDirectory(prefix='bench_data_') as tmp:
        tmp = Path(tmp)
        paths = write_jpegs(tmp, args.images, args.seed)
        mos = np.random.default_rng(args.seed).uniform(0, 100, size=len(paths))
        start = time.perf_counter()
        images, _ = data_loader.load_images(paths, tuple(args.resize), cache_dir=tmp / 'cache', progress=False)
        build = time.perf_counter() - start
        start = time.perf_counter()
        images, _ = data_loader.load_images(paths, tuple(args.resize), cache_dir=tmp / 'cache', progress=False)
        load = time.perf_counter() - start
        original = original_patches_per_s(paths, mos, args)
    print(f'cache build: {len(paths)} images 1024x768 -> {args.resize[0]}x{args.resize[1]} in {build:.2f} s '
          f'({len(paths) / build:.0f} images/s); cache load: {load:.2f} s')

    pil_images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    speedups = {}
    for jitter in (False, True):
        naive, batched = [], []
        for _ in range(max(1, args.repeats)):
            naive.append(naive_patches_per_s(pil_images, mos, args, jitter))
            batched.append(sampler_patches_per_s(images, mos, args, jitter))
        speedups[jitter] = max(batched) / max(naive)
        label = 'jitter' if jitter else 'no jitter'
        print(f'{label:>9}: naive per-sample {max(naive):8.0f} patches/s (median {np.median(naive):.0f}) | '
              f'batched ({args.device}) {max(batched):8.0f} patches/s (median {np.median(batched):.0f}) | '
              f'{speedups[jitter]:.1f}x (medians {np.median(batched) / np.median(naive):.1f}x)')
    print(f"user's original loader (decode + resize + jitter per patch): {original:.0f} patches/s; "
          f'batched with jitter is {max(batched) / original:.0f}x that')
    print(f'data pipeline speedup: {speedups[False]:.1f}x (no jitter), {speedups[True]:.1f}x (jitter)')


if __name__ == '__main__':
    main()
