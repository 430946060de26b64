"""No host<->device synchronisation inside a training step (issue 20).

A GPU runs ahead of the Python that queues its work only while nothing reads a value back:
every `.item()`, `.cpu()`, `.tolist()`, `.nonzero()`, `bool(t)`, `float(t)` or boolean-mask
index waits for the queue to drain. On the CPU nothing waits, so these tests count the calls
instead: each is wrapped with a counter, and a step (every loss, both trainers' steps) must make
none. benchmarks/gpu_check.py asserts the same on a GPU with torch.cuda.set_sync_debug_mode.
"""
import contextlib
import shlex

import numpy as np
import pytest
import torch

from iqa import engine, losses, runtime
from iqa.clip import models as models_clip
import models_swin
import train_clip
from test_train_swin import random_batch

SYNCING_METHODS = ('item', 'cpu', 'tolist', 'nonzero', '__bool__', '__float__', '__int__')


class SyncCounter:
    """Counts synchronising tensor calls while `active`; `calls` names each one."""

    def __init__(self):
        self.active, self.calls = False, []

    def note(self, name):
        if self.active:
            self.calls.append(name)


@contextlib.contextmanager
def counting_syncs(monkeypatch):
    counter = SyncCounter()
    for name in SYNCING_METHODS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **kw):
            counter.note(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            counter.note('boolean index')
        return real_getitem(self, index)
    monkeypatch.setattr(torch.Tensor, '__getitem__', getitem)
    real_unique = torch.unique

    def unique(*a, **kw):
        counter.note('torch.unique')   # its output size is data-dependent: the host must wait for it
        return real_unique(*a, **kw)
    monkeypatch.setattr(torch, 'unique', unique)
    try:
        yield counter
    finally:
        counter.active = False
        monkeypatch.undo()


def test_the_counter_sees_each_kind_of_sync(monkeypatch):
    t = torch.arange(4.0)
    with counting_syncs(monkeypatch) as counter:
        counter.active = True
        t.sum().item(), t.cpu(), t.tolist(), t.nonzero(), bool(t[0]), float(t[0]), t[t > 1]
        torch.unique(t)
    assert counter.calls == ['item', 'cpu', 'tolist', 'nonzero', '__bool__', '__float__', 'boolean index',
                             'torch.unique']


@pytest.mark.parametrize('loss_type', losses.LOSS_TYPES)
@pytest.mark.parametrize('alpha', [0.0, 0.5])
def test_every_loss_and_its_gradient_make_no_sync(monkeypatch, loss_type, alpha):
    pred, mos = random_batch(0)
    pred.requires_grad_(True)
    args = engine.train_settings(loss_type=loss_type, ranking_loss_alpha=alpha)
    with counting_syncs(monkeypatch) as counter:
        counter.active = True
        losses.total_loss(pred, mos, args).backward()
    assert counter.calls == []


def test_pairwise_losses_of_all_tied_targets_are_zero_with_zero_gradient():
    pred = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for loss in (losses.rank_loss, losses.pairwise_fidelity_loss, losses.margin_ranking_loss):
        value = loss(pred, torch.ones(5, dtype=torch.float64))
        value.backward()
        assert value.item() == 0.0 and torch.equal(pred.grad, torch.zeros(5, dtype=torch.float64))
        pred.grad = None


class ListSampler:
    """A sampler of fixed batches that marks where each step starts and ends for the counter."""

    def __init__(self, batches, counter):
        self.list, self.counter = batches, counter

    def __len__(self):
        return len(self.list)

    def batches(self, epoch):
        for batch in self.list:
            self.counter.active = True
            yield batch
            self.counter.active = False


@pytest.mark.parametrize('loss_type', ['l1', 'rank', 'pairwise', 'hinge'])
def test_a_swin_training_step_makes_no_sync(monkeypatch, loss_type):
    torch.manual_seed(0)
    model = models_swin.build_model('nano', pretrained=False)
    args = engine.train_settings(batch_size=2, patch_size=224, loss_type=loss_type, ranking_loss_alpha=0.3,
                                 grad_accum_steps=2)
    optimizer = runtime.make_optimizer(model.parameters(), args, 'cpu')   # the trainer's (fused) AdamW
    for group in optimizer.param_groups:
        group['lr'] = 1e-5
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 224, 224, generator=g), torch.rand(2, generator=g) * 4 + 1,
                torch.arange(2)) for _ in range(2)]
    monkeypatch.setattr(engine, 'CHECK_EVERY', 1000)   # the check every CHECK_EVERY steps reads back, by design
    with counting_syncs(monkeypatch) as counter:
        sampler = ListSampler(batches, counter)
        engine.train_one_epoch(model, optimizer, sampler, 0, args, torch.device('cpu'), False, 0, 1, 'test')
    assert counter.calls == []


def clip_epoch_syncs(monkeypatch, n_images, use_explanations, text_frozen):
    """Synchronising calls of one train_clip epoch over `n_images` images at batch 2."""
    torch.manual_seed(0)
    model = models_clip.ClipQualityModel('nano', pretrained=False)
    extra = ' --use_explanations' if use_explanations else ''
    args = train_clip.check_args(train_clip.build_parser().parse_args(shlex.split(f'--batch_size 2{extra}')),
                                 lambda m: None)
    rng = np.random.default_rng(0)
    prompts = ['a cat', 'a dog', 'a red car']
    size = model.image_size
    data = {'train': np.arange(n_images), 'train_images': torch.randint(0, 255, (n_images, 3, size, size),
                                                                         dtype=torch.uint8),
            'prompt_ids': model.tokenizer(prompts), 'prompt_index': rng.integers(0, 3, n_images),
            'mos_q': rng.uniform(1, 5, n_images), 'mos_c': rng.uniform(1, 5, n_images), 'scale_q': 5.0,
            'scale_c': 5.0, 'text_cache': None, 'explanation_cache': None,
            'explanation_ids': model.tokenizer(['sharp', 'blurry']), 'explanation_index': rng.integers(0, 2, n_images)}
    if text_frozen:
        data['text_cache'] = torch.randn(3, model.embed_dim if hasattr(model, 'embed_dim') else 64)
        data['explanation_cache'] = torch.randn(2, data['text_cache'].shape[1])
    optimizer = runtime.make_optimizer([{'params': list(model.parameters()), 'lr': 1e-5, 'initial_lr': 1e-5}],
                                       args, 'cpu')
    state = {'step': 0, 'total_steps': 100}
    with counting_syncs(monkeypatch) as counter:
        counter.active = True
        train_clip.train_one_epoch(model, optimizer, data, 0, 1, args, torch.device('cpu'), False, state)
    return counter.calls


@pytest.mark.parametrize('use_explanations,text_frozen', [(False, False), (True, False), (True, True)])
def test_a_clip_training_step_makes_no_sync(monkeypatch, use_explanations, text_frozen):
    # an epoch of 1 step and one of 3 make the same calls: those of the epoch's end, none per step
    one = clip_epoch_syncs(monkeypatch, 2, use_explanations, text_frozen)
    three = clip_epoch_syncs(monkeypatch, 6, use_explanations, text_frozen)
    assert one == three == ['tolist']   # the epoch's mean losses, read once


# --------------------------------------------------------------------------- evaluation

class MeanModel(torch.nn.Module):
    """A score per patch: the mean of a 1x1 convolution, enough to test the bookkeeping."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.conv(x).mean(dim=(1, 2, 3))


def eval_syncs(monkeypatch, fn):
    with counting_syncs(monkeypatch) as counter:
        counter.active = True
        result = fn()
    return counter.calls, result


def test_evaluation_reads_results_back_once_per_split_with_the_same_scores(monkeypatch):
    from iqa import evaluation
    torch.manual_seed(0)
    model = MeanModel()
    images = torch.randint(0, 255, (6, 3, 40, 40), dtype=torch.uint8)

    def score(batch_size):
        return evaluation.predict_scores(model, images, patch_size=32, patch_num=3, batch_size=batch_size)
    one, by_one_batch = eval_syncs(monkeypatch, lambda: score(18))
    many, by_many = eval_syncs(monkeypatch, lambda: score(4))   # 5 batches
    assert one == many and one.count('cpu') == 1
    np.testing.assert_array_equal(by_one_batch, by_many)
    # the score is the mean over the image's crops, as cut by eval_patch_batches
    import data_loader
    expected = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for patches, index in data_loader.eval_patch_batches(images, patch_size=32, patch_num=3, batch_size=5):
            expected.index_add_(0, index, model(patches).double() / 3)
    np.testing.assert_allclose(by_many, expected.numpy(), rtol=1e-12)


def test_clip_evaluation_reads_results_back_once(monkeypatch):
    from iqa.clip import evaluation as clip_eval
    torch.manual_seed(0)
    model = models_clip.ClipQualityModel('nano', pretrained=False)
    size = model.image_size
    images = torch.randint(0, 255, (5, 3, size, size), dtype=torch.uint8)
    prompt_ids, prompt_index = model.tokenizer(['a cat', 'a dog']), [0, 1, 1, 0, 1]

    def score(batch_size):
        return clip_eval.predict(model, images, prompt_ids, prompt_index, batch_size=batch_size)
    one, (q1, c1, cos1) = eval_syncs(monkeypatch, lambda: score(5))
    many, (q2, c2, cos2) = eval_syncs(monkeypatch, lambda: score(2))   # 3 batches
    assert one == many == ['cpu']
    for a, b in ((q1, q2), (c1, c2), (cos1, cos2)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
