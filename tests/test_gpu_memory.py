"""Memory on shared GPUs and in host RAM (issue 20, items 3 and 4), proven on the CPU.

The memory plan is a pure function of simulated cards (24/40/80 GB), the runs sharing one
(IQA_GPU_SHARED), the processes of a run and the measured step and evaluation batch; the
probes that measure those end with advice when they run out of memory; a decoded cache is
memory-mapped and its splits are row indices into it, so processes share one copy in RAM.
Each test failed before its change.
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import data_loader
import dataset_fixtures as fx
import train_swin
from iqa.data import placement
from iqa.evaluation import predict_scores
from test_gpu_paths import AFTER_MODEL, CARDS, GIB, KONIQ_SPAQ, SWIN_B_STEP, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = 0.4 * GIB      # Swin-B's weights: what torch.cuda.memory_allocated reports after the model
EVAL_BATCH = 1 * GIB     # one evaluation forward of 64 patches, no gradients, bf16


def shared_plan(card, runs, world=1, step=SWIN_B_STEP, eval_bytes=EVAL_BATCH, free=None, images_on='auto'):
    total = CARDS[card]
    free = total - AFTER_MODEL if free is None else free   # the other run may not have started yet
    return data_loader.plan_image_memory(int(free), int(total), int(step), KONIQ_SPAQ, world, images_on,
                                         eval_bytes=int(eval_bytes), gpu_shared=runs, own_bytes=int(WEIGHTS))


def on_gpu(p):
    return sum(size for name, size in KONIQ_SPAQ if p['where'][name] == 'gpu')


# --------------------------------------------------------------------------- shared cards

@pytest.mark.parametrize('world', [1, 2])
@pytest.mark.parametrize('card', [24, 40, 80])
def test_runs_sharing_a_card_plan_within_their_share(card, world):
    """Two runs on one card (run_experiments.sh --gpus 0,0) each planned from the free memory
    at its own moment: the first saw an empty card and took it, and the second ran out of memory."""
    alone, two = shared_plan(card, 1, world, eval_bytes=0), shared_plan(card, 2, world)
    assert alone['where'] == plan(card, world)['where']     # one run: the plan of a card to itself
    assert on_gpu(two) <= on_gpu(alone)
    if two['fits']:
        # both runs' CUDA context and weights, step, evaluation batch and images fit the card together
        assert 2 * (AFTER_MODEL + SWIN_B_STEP + EVAL_BATCH + on_gpu(two)) <= CARDS[card]
    text = '\n'.join(two['lines'])
    assert 'shared by 2 runs (IQA_GPU_SHARED=2)' in text and 'an evaluation batch 1.0 GiB' in text
    if card == 24:   # a Swin-B step at batch 32 twice does not fit 24 GB: the plan says what to do
        assert not two['fits'] and set(two['where'].values()) == {'host'}
        assert 'lower --batch_size' in text and 'fewer than 2 runs on this card' in text
    if card == 40:
        assert two['fits'] and two['where']['train'] == 'gpu' and two['where']['spaq'] == 'host'
        assert set(alone['where'].values()) == {'gpu'}   # alone, everything would have gone there
    if card == 80:
        assert two['fits'] and set(two['where'].values()) == {'gpu'}


def test_a_shared_card_never_plans_beyond_its_free_memory():
    # the other run already holds more than half of the card: what is free is all there is
    p = shared_plan(40, 2, free=5 * GIB)
    assert not p['fits'] and set(p['where'].values()) == {'host'}
    # a smaller step on 24 GB shared by two: the training images still fit the share
    small = shared_plan(24, 2, step=4 * GIB)
    assert small['fits'] and small['where']['train'] == 'gpu' and small['where']['spaq'] == 'host'
    assert 2 * (AFTER_MODEL + 4 * GIB + EVAL_BATCH + on_gpu(small)) <= CARDS[24]
    assert set(shared_plan(80, 2, images_on='cpu')['where'].values()) == {'host'}
    with pytest.raises(ValueError, match='gpu_shared'):
        shared_plan(80, 0)


def test_the_runs_sharing_a_gpu_come_from_the_launcher():
    assert placement.runs_sharing_gpu({}) == 1
    assert placement.runs_sharing_gpu({'IQA_GPU_SHARED': ''}) == 1
    assert placement.runs_sharing_gpu({'IQA_GPU_SHARED': '2'}) == 2
    for bad in ('0', 'two', '-1'):
        with pytest.raises(ValueError, match='IQA_GPU_SHARED'):
            placement.runs_sharing_gpu({'IQA_GPU_SHARED': bad})


# --------------------------------------------------------------------------- the evaluation batch

def test_the_evaluation_batch_is_counted():
    """--eval_batch_size was not in the plan: a set placed to the last byte left no room for it."""
    assert plan(24)['where']['test'] == 'gpu'
    p = shared_plan(24, 1, eval_bytes=4 * GIB)
    assert p['where'] == {'train': 'gpu', 'val': 'gpu', 'test': 'host', 'spaq': 'host'}
    assert p['budget_bytes'] == plan(24)['budget_bytes'] - 4 * GIB
    huge = shared_plan(24, 1, eval_bytes=15 * GIB)
    assert not huge['fits'] and '--eval_batch_size' in '\n'.join(huge['lines'])


def fake_card(monkeypatch, free, total, allocated):
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device=None: allocated)


def plan_args(**kw):
    return argparse.Namespace(**{'batch_size': 32, 'eval_batch_size': 64, 'patch_size': 224,
                                 'images_on': 'cpu', **kw})


def test_train_swin_plans_with_the_measured_eval_batch_and_the_shared_card(monkeypatch):
    calls = {}
    monkeypatch.setattr(train_swin, 'measure_step_bytes', lambda model, args, device, amp: 8 * GIB)

    def measure_eval(model, batch_size, patch_size, device, amp):
        calls['eval'] = (batch_size, patch_size)
        return 3 * GIB
    monkeypatch.setattr(placement, 'measure_eval_bytes', measure_eval)
    real_plan = placement.plan_image_memory

    def recording_plan(*a, **kw):
        calls['plan'] = kw
        return real_plan(*a, **kw)
    monkeypatch.setattr(placement, 'plan_image_memory', recording_plan)
    monkeypatch.setenv('IQA_GPU_SHARED', '2')
    fake_card(monkeypatch, int(39 * GIB), int(40 * GIB), int(WEIGHTS))
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    sets = {'train': data_loader.ImageRows(images, [0, 2, 4]), 'test': data_loader.ImageRows(images, [1, 3])}
    lines = []
    out = train_swin.plan_and_place(sets, plan_args(), torch.device('cuda', 0), True, 1, None, lines.append)
    assert calls['eval'] == (64, 224)
    assert calls['plan']['eval_bytes'] == 3 * GIB and calls['plan']['gpu_shared'] == 2
    assert calls['plan']['own_bytes'] == int(WEIGHTS)
    assert out['train'] is sets['train'] and out['test'] is sets['test']   # --images_on cpu: views stay
    assert 'an evaluation batch 3.0 GiB' in lines[0] and 'IQA_GPU_SHARED=2' in lines[1]


# --------------------------------------------------------------------------- an out-of-memory probe

def oom(*args, **kwargs):
    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')


def test_a_probe_out_of_memory_gives_the_advice_not_a_traceback(monkeypatch):
    monkeypatch.delenv('IQA_GPU_SHARED', raising=False)
    monkeypatch.setattr(train_swin, 'measure_step_bytes', oom)
    with pytest.raises(SystemExit) as e:
        train_swin.plan_and_place({}, plan_args(images_on='auto'), torch.device('cuda', 0), True, 1, None, print)
    msg = str(e.value)
    assert msg.startswith('ERROR: out of memory on cuda:0 measuring a training step of --batch_size 32')
    assert '--batch_size 16 with --grad_accum_steps 2' in msg and '--images_on cpu' in msg
    assert 'fewer runs' not in msg

    monkeypatch.setattr(train_swin, 'measure_step_bytes', lambda model, args, device, amp: GIB)
    monkeypatch.setattr(placement, 'measure_eval_bytes', oom)
    monkeypatch.setenv('IQA_GPU_SHARED', '2')
    with pytest.raises(SystemExit) as e:
        train_swin.plan_and_place({}, plan_args(), torch.device('cuda', 0), True, 1, None, print)
    msg = str(e.value)
    assert 'evaluation batch of --eval_batch_size 64' in msg and '--eval_batch_size 32' in msg
    assert 'fewer runs on this card: 2 share it' in msg and '--images_on cpu' not in msg   # already on the host


# --------------------------------------------------------------------------- splits as rows

def test_a_split_is_rows_of_the_images_not_a_copy_and_gives_the_same_patches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 3, 40, 48), dtype=torch.uint8, generator=gen)
    rows = np.array([7, 2, 5, 0, 8])
    split = data_loader.ImageRows(images, rows)
    assert split.shape == (5, 3, 40, 48) and split.numel() == images[rows].numel() and len(split) == 5
    assert torch.equal(split.to('cpu'), images[rows])
    mos = np.arange(5.0)
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        kw = dict(patch_size=16, patch_num=3, batch_size=4, seed=3, rank=rank, world_size=world, place=False)
        copy = data_loader.TrainPatchSampler(images[rows], mos, **kw)
        view = data_loader.TrainPatchSampler(split, mos, **kw)
        assert view.images.data_ptr() == images.data_ptr()          # no copy of the split
        assert len(copy) == len(view)
        for a, b in zip(copy.batches(1), view.batches(1)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    for crop in data_loader.EVAL_CROPS:
        kw = dict(patch_size=16, patch_num=3, batch_size=4, crop=crop, seed=5, image_ids=[1, 3, 4])
        for a, b in zip(data_loader.eval_patch_batches(images[rows], **kw), data_loader.eval_patch_batches(split, **kw)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(0))
    kw = dict(patch_size=16, patch_num=4, batch_size=3, crop='fixed')
    assert np.array_equal(predict_scores(model, images[rows], **kw), predict_scores(model, split, **kw))
    with pytest.raises(data_loader.DataError, match='rows must be in 0..8'):
        data_loader.ImageRows(images, [9])


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='needs Linux /proc/self/maps')
def test_a_cached_set_is_memory_mapped(tmp_path):
    paths = [fx.write_image(tmp_path / f'{i}.png', seed=i) for i in range(3)]
    decoded, _ = data_loader.load_images(paths, (32, 40), cache_dir=tmp_path / 'cache', progress=False)
    again, _ = data_loader.load_images(paths, (32, 40), cache_dir=tmp_path / 'cache', progress=False)
    assert torch.equal(decoded, again)
    npy = str(next((tmp_path / 'cache').glob('*.npy')))
    for images in (decoded, again):   # the decoding process maps the file it wrote, as the others do
        assert mapped_file(images.data_ptr()) == npy


def mapped_file(address):
    """The file mapped at `address` in this process (/proc/self/maps), or None."""
    with open('/proc/self/maps') as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(v, 16) for v in fields[0].split('-'))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else None
    return None


# --------------------------------------------------------------------------- two processes, one copy

READER = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    import torch
    import data_loader

    def memory():
        out = {}
        for name in ('/proc/self/status', '/proc/self/smaps_rollup'):
            for line in open(name):
                key, _, value = line.partition(':')
                if key in ('VmRSS', 'RssAnon', 'RssFile', 'Pss'):
                    out[key] = int(value.split()[0]) * 1024
        return out

    paths, hw, cache, me, other = json.loads(sys.argv[1])
    before = memory()
    images, kept = data_loader.load_images(paths, hw, cache_dir=cache, progress=False)
    split = data_loader.ImageRows(images, np.arange(0, len(images), 2))
    sampler = data_loader.TrainPatchSampler(split, np.arange(len(split), dtype=float), patch_size=32,
                                            patch_num=2, batch_size=2, color_jitter=False, place=False)
    next(sampler.batches(0))
    after_split = memory()
    for i in range(images.shape[0]):
        int(images[i].max())      # read every page of the cache
    open(me, 'w').close()         # both hold the whole set mapped when each measures
    while not os.path.exists(other):
        time.sleep(0.05)
    touched = memory()
    open(me + '.done', 'w').close()
    while not os.path.exists(other + '.done'):
        time.sleep(0.05)
    print(json.dumps({'before': before, 'split': after_split, 'touched': touched,
                      'same_storage': sampler.images.data_ptr() == images.data_ptr()}))
''')


@pytest.mark.skipif(not os.path.exists('/proc/self/smaps_rollup'), reason='needs Linux /proc/self/smaps_rollup')
def test_two_processes_read_one_cache_without_a_second_copy(tmp_path):
    """Each DDP rank read the whole decoded set into its own memory and copied every split:
    KonIQ + SPAQ cost about 18 GB per rank. Mapped and indexed, the machine holds one copy."""
    hw = (2400, 3600)   # 8 images of 25.9 MB: a 207 MB cache
    paths = [str(fx.write_image(tmp_path / f'{i}.png', hw=(24, 36), seed=i)) for i in range(8)]
    cache = str(tmp_path / 'cache')
    images, _ = data_loader.load_images(paths, hw, cache_dir=cache, progress=False)
    size = images.numel()
    del images
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    marks = [str(tmp_path / 'a'), str(tmp_path / 'b')]
    procs = [subprocess.Popen([sys.executable, '-c', READER, json.dumps([paths, hw, cache, me, other])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for me, other in (marks, marks[::-1])]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    grow = lambda r, key, at='touched': r[at][key] - r['before'][key]
    for r in results:
        print({k: f'{grow(r, k) / 2**20:.1f} MiB' for k in ('VmRSS', 'RssAnon', 'RssFile', 'Pss')})
        assert r['same_storage']
        assert grow(r, 'RssAnon', 'split') < 0.1 * size     # the split and a batch of it: no copy
        assert grow(r, 'RssAnon') < 0.1 * size               # every page read, none copied
        assert grow(r, 'RssFile') > 0.9 * size               # ... read through the shared map
    # proportional set size splits shared pages between their processes: one copy for the two
    assert sum(grow(r, 'Pss') for r in results) < 1.3 * size
