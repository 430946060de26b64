"""iqa/ckpt.py: atomic writes under a full disk, best/last retention, naming, loading old and new files."""
import collections
import datetime
import errno
import json
import os
import random
import stat
import sys

import numpy as np
import pytest
import torch
from torch import nn

from iqa import ckpt as checkpoints
from iqa import runs
from iqa.ckpt import (CHECKPOINT_FORMAT, CheckpointSaver, atomic_torch_save, best_checkpoint_name,
                      capture_rng_state, load_checkpoint, restore_rng_state)
from iqa.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from iqa.runs import code_version, run_name

ENOSPC = OSError(errno.ENOSPC, 'No space left on device')


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def tiny_checkpoint(epoch=1, **extra):
    return {'state_dict': tiny_model().state_dict(), 'config': {'model_size': 'nano'},
            'epoch': epoch, 'round': 1, 'metrics': {'test_srcc': 0.5}, **extra}


def leftover_temp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith('.tmp')]


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel (.module) or torch.compile (._orig_mod)."""

    def __init__(self, attr, model):
        super().__init__()
        setattr(self, attr, model)


# ---------------------------------------------------------------- atomic writes

def test_atomic_writes_produce_the_content_and_normal_permissions(tmp_path):
    atomic_write_bytes(tmp_path / 'a.bin', b'\x00\x01')
    atomic_write_text(tmp_path / 'b.txt', '最佳 SRCC 0.9378\n')
    atomic_write_json(tmp_path / 'c.json', {'srcc': np.float64(0.9), 'n': np.int64(3),
                                            'ci': np.array([0.1, 0.2]), 'bad': float('nan')})
    assert (tmp_path / 'a.bin').read_bytes() == b'\x00\x01'
    assert (tmp_path / 'b.txt').read_text(encoding='utf-8') == '最佳 SRCC 0.9378\n'
    text = (tmp_path / 'c.json').read_text()
    assert text.endswith('\n') and 'NaN' not in text  # strict JSON: NaN written as null
    assert json.loads(text) == {'srcc': 0.9, 'n': 3, 'ci': [0.1, 0.2], 'bad': None}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / 'a.bin').st_mode) == 0o666 & ~umask
    assert leftover_temp_files(tmp_path) == []


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / 'config.json'
    atomic_write_json(path, {'lr': 5e-7})

    def full_disk(src, dst):
        raise ENOSPC
    monkeypatch.setattr(os, 'replace', full_disk)
    for write in (lambda: atomic_write_json(path, {'lr': 1}),
                  lambda: atomic_write_text(path, 'x'),
                  lambda: atomic_write_bytes(path, b'x')):
        with pytest.raises(OSError) as info:
            write()
        assert info.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {'lr': 5e-7}
    assert leftover_temp_files(tmp_path) == []


def test_unserialisable_json_never_touches_the_file(tmp_path):
    path = tmp_path / 'summary.json'
    atomic_write_json(path, {'ok': 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {'bad': object()})
    assert json.loads(path.read_text()) == {'ok': 1}
    assert leftover_temp_files(tmp_path) == []


def test_torch_save_failing_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'last.pkl'
    atomic_torch_save({'state_dict': {'w': torch.ones(2)}}, path)
    real_save = torch.save

    def half_then_full_disk(obj, f):
        f.write(b'PK\x03\x04 half a zip')  # a partial file exists when the disk fills up
        raise ENOSPC
    monkeypatch.setattr(torch, 'save', half_then_full_disk)
    with pytest.raises(OSError, match='No space left on device'):
        atomic_torch_save({'state_dict': {'w': torch.zeros(2)}}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.equal(torch.load(path, weights_only=True)['state_dict']['w'], torch.ones(2))
    assert leftover_temp_files(tmp_path) == []


def test_interrupt_mid_write_removes_temp(tmp_path, monkeypatch):
    def interrupted(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({}, tmp_path / 'x.pkl')
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='needs RLIMIT_FSIZE')
def test_real_write_error_surfaces_as_oserror_not_torch_runtimeerror(tmp_path):
    # A file-size limit makes the kernel fail write() the way a full disk does (EFBIG instead
    # of ENOSPC). torch's zip writer wraps that in a RuntimeError; we must re-raise the OSError.
    import resource
    import signal
    path = tmp_path / 'best.pkl'
    atomic_torch_save({'w': torch.ones(3)}, path)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(OSError) as info:
            atomic_torch_save({'w': torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == errno.EFBIG
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.ones(3))
    assert leftover_temp_files(tmp_path) == []


# ---------------------------------------------------------------- names

def test_run_name_matches_the_users_folders():
    assert (run_name('koniq-10k', 0.3, datetime.datetime(2025, 12, 21, 21, 51, 24))
            == 'koniq-10k-swin-ranking-alpha0.3_20251221_215124')
    assert (run_name('koniq-10k', 0, datetime.datetime(2025, 12, 23, 0, 22, 26))
            == 'koniq-10k-swin_20251223_002226')
    assert run_name('spaq', 1.0, datetime.datetime(2025, 1, 2, 3, 4, 5)) == 'spaq-swin-ranking-alpha1_20250102_030405'
    with pytest.raises(ValueError, match='ranking_loss_alpha'):
        run_name('koniq-10k', -0.1, datetime.datetime.now())
    with pytest.raises(ValueError, match='dataset'):
        run_name('a/b', 0, datetime.datetime.now())


def test_best_checkpoint_name():
    assert best_checkpoint_name(0.93781, 0.94849) == 'best_model_srcc_0.9378_plcc_0.9485.pkl'
    with pytest.raises(ValueError, match='non-finite'):
        best_checkpoint_name(float('nan'), 0.9)


def test_code_version(tmp_path, monkeypatch):
    assert code_version(str(tmp_path)) == 'unknown'  # not a git repository
    assert isinstance(code_version(), str) and code_version()
    monkeypatch.setenv('PATH', str(tmp_path))  # no git executable at all
    assert code_version() == 'unknown'


# ---------------------------------------------------------------- CheckpointSaver

def best_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith('best_model_'))


def test_keep_one_best_deletes_older_only_after_saving(tmp_path):
    saver = CheckpointSaver(tmp_path, keep=1)
    assert saver.best_path is None and saver.last_path is None
    p1 = saver.save_best(tiny_checkpoint(1), 0.90, 0.91)
    assert p1 == str(tmp_path / 'best_model_srcc_0.9000_plcc_0.9100.pkl') and saver.best_path == p1
    p2 = saver.save_best(tiny_checkpoint(2), 0.92, 0.93)
    assert best_files(tmp_path) == ['best_model_srcc_0.9200_plcc_0.9300.pkl']
    assert saver.best_path == p2 and load_checkpoint(p2)['epoch'] == 2
    # the same 4-decimal name again replaces the file and must not delete it
    p3 = saver.save_best(tiny_checkpoint(3), 0.92001, 0.93001)
    assert p3 == p2 and best_files(tmp_path) == [os.path.basename(p2)]
    assert load_checkpoint(p3)['epoch'] == 3


def test_keep_two_best_and_resume_counts_existing_files(tmp_path):
    saver = CheckpointSaver(tmp_path, keep=2)
    for epoch, s in enumerate([0.1, 0.2, 0.3], start=1):
        saver.save_best(tiny_checkpoint(epoch), s, s)
    assert best_files(tmp_path) == ['best_model_srcc_0.2000_plcc_0.2000.pkl',
                                    'best_model_srcc_0.3000_plcc_0.3000.pkl']
    os.utime(tmp_path / best_files(tmp_path)[0], (1, 1))  # make mtimes unambiguous
    resumed = CheckpointSaver(tmp_path, keep=2)
    assert resumed.best_path == str(tmp_path / 'best_model_srcc_0.3000_plcc_0.3000.pkl')
    resumed.save_best(tiny_checkpoint(4), 0.4, 0.4)
    assert best_files(tmp_path) == ['best_model_srcc_0.3000_plcc_0.3000.pkl',
                                    'best_model_srcc_0.4000_plcc_0.4000.pkl']
    with pytest.raises(ValueError, match='keep'):
        CheckpointSaver(tmp_path, keep=0)


def test_full_disk_during_best_save_keeps_previous_and_training_continues(tmp_path, monkeypatch, capsys):
    saver = CheckpointSaver(tmp_path, keep=1)
    first = saver.save_best(tiny_checkpoint(1), 0.90, 0.91)
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b'PK partial')
        raise ENOSPC
    monkeypatch.setattr(torch, 'save', full_disk)
    assert saver.save_best(tiny_checkpoint(2), 0.95, 0.96) is None
    err = capsys.readouterr().err
    assert 'could not save checkpoint' in err and 'best_model_srcc_0.9500_plcc_0.9600.pkl' in err
    assert 'No space left on device' in err
    assert f'the previous best {first} is intact' in err and 'training continues' in err
    assert saver.errors and 'No space left on device' in saver.errors[0]
    monkeypatch.setattr(torch, 'save', real_save)
    assert saver.best_path == first and best_files(tmp_path) == [os.path.basename(first)]
    assert load_checkpoint(first)['epoch'] == 1
    assert leftover_temp_files(tmp_path) == []


def test_last_is_replaced_and_survives_a_failed_save(tmp_path, monkeypatch):
    messages = []
    saver = CheckpointSaver(tmp_path, warn=messages.append)
    assert saver.save_last(tiny_checkpoint(1)) == str(tmp_path / 'last.pkl')
    saver.save_last(tiny_checkpoint(2))
    assert load_checkpoint(saver.last_path)['epoch'] == 2

    def full_disk(obj, f):
        raise ENOSPC
    monkeypatch.setattr(torch, 'save', full_disk)
    assert saver.save_last(tiny_checkpoint(3)) is None
    assert len(messages) == 1 and 'the previous' in messages[0] and 'last.pkl is intact' in messages[0]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / 'last.pkl')['epoch'] == 2
    assert os.listdir(tmp_path) == ['last.pkl']


def test_saver_rejects_content_that_would_not_load_back(tmp_path):
    saver = CheckpointSaver(tmp_path)
    with pytest.raises(TypeError, match=r"checkpoint\['rng_state'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        saver.save_last(tiny_checkpoint(rng_state={'numpy': ['MT19937', np.zeros(3)]}))
    with pytest.raises(ValueError, match='"state_dict"'):
        saver.save_last({'epoch': 1})
    assert os.listdir(tmp_path) == []


def test_full_training_state_loads_with_weights_only(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = {'state_dict': model.state_dict(), 'config': {'lr': 5e-7, 'model_size': 'nano'},
             'epoch': 3, 'round': 1, 'code_version': 'abc123-dirty',
             'metrics': {'test_srcc': np.float64(0.93), 'epoch': np.int64(3)},
             'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
             'rng_state': capture_rng_state(), 'best': {'test_srcc': 0.93}, 'early_stopping': {'bad_epochs': 0}}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = CheckpointSaver(tmp_path).save_last(state)

    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded['format'] == CHECKPOINT_FORMAT and loaded['epoch'] == 3
    assert loaded['metrics'] == {'test_srcc': 0.93, 'epoch': 3}
    assert type(loaded['metrics']['test_srcc']) is float
    assert loaded['code_version'] == 'abc123-dirty' and loaded['path'] == path
    fresh = tiny_model()
    fresh.load_state_dict(loaded['state_dict'])
    torch.optim.AdamW(fresh.parameters(), lr=1e-3).load_state_dict(loaded['optimizer'])
    restore_rng_state(loaded['rng_state'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize('wrap', ['bare', 'module', '_orig_mod', 'module+_orig_mod', 'dict-model', 'dict-state_dict'])
def test_load_old_bare_state_dicts(tmp_path, wrap):
    model = tiny_model()
    saved = model
    for attr in ('module', '_orig_mod'):
        if attr in wrap.split('+'):
            saved = Wrapper(attr, saved)
    sd = saved.state_dict()
    if wrap == 'module':
        assert next(iter(sd)).startswith('module.')
    obj = {'model': sd} if wrap == 'dict-model' else {'state_dict': sd, 'epoch': 7} if wrap == 'dict-state_dict' else sd
    path = tmp_path / 'best_model_srcc_0.9378_plcc_0.9485.pkl'
    torch.save(obj, path)  # what the user's train_swin.py did (not atomic)

    loaded = load_checkpoint(path)
    assert loaded['format'] == checkpoints.BARE_FORMAT
    assert loaded['config'] is None and loaded['optimizer'] is None
    assert loaded['epoch'] == (7 if wrap == 'dict-state_dict' else None)
    assert list(loaded['state_dict']) == list(model.state_dict())
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    fresh.load_state_dict(loaded['state_dict'])  # strict: every key matches
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_real_submodule_named_module_is_not_stripped():
    sd = collections.OrderedDict([('module.w', torch.zeros(1)), ('head.w', torch.zeros(1))])
    assert list(checkpoints.strip_wrapper_prefixes(sd)) == ['module.w', 'head.w']


def test_load_errors_name_the_path_and_what_was_expected(tmp_path):
    missing = tmp_path / 'nope.pkl'
    with pytest.raises(FileNotFoundError, match='nope.pkl'):
        load_checkpoint(missing)

    good = tmp_path / 'good.pkl'
    atomic_torch_save({'format': CHECKPOINT_FORMAT, **tiny_checkpoint()}, good)
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match=r'truncated\.pkl.*truncated, corrupt or not a PyTorch file'
                                         r'.*expected a checkpoint saved by train_swin\.py'):
        load_checkpoint(truncated)

    text = tmp_path / 'notes.pkl'
    text.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='notes.pkl'):
        load_checkpoint(text)

    a_list = tmp_path / 'list.pkl'
    torch.save([1, 2, 3], a_list)
    with pytest.raises(ValueError, match=r'list\.pkl holds a list, not a checkpoint'):
        load_checkpoint(a_list)

    other = tmp_path / 'other.pkl'
    torch.save({'weights': [1.0], 'lr': 0.1}, other)
    with pytest.raises(ValueError, match=r"holds a dict with keys \['lr', 'weights'\]"):
        load_checkpoint(other)

    future = tmp_path / 'future.pkl'
    torch.save({'format': 'swin-iqa-checkpoint/2', 'state_dict': {'w': torch.zeros(1)}}, future)
    with pytest.raises(ValueError, match="format 'swin-iqa-checkpoint/2'"):
        load_checkpoint(future)

    with pytest.raises(ValueError, match='is a folder'):
        load_checkpoint(tmp_path)


def test_file_with_python_objects_needs_explicit_trust(tmp_path):
    path = tmp_path / 'numpy.pkl'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'rng': np.zeros(3)}, path)
    with pytest.raises(ValueError, match=r'numpy\.pkl contains a Python object.*weights_only=False'):
        load_checkpoint(path)
    assert torch.equal(load_checkpoint(path, weights_only=False)['state_dict']['w'], torch.zeros(1))


def test_run_dir_gets_a_suffix_when_two_runs_start_in_the_same_second(tmp_path):
    first = runs.make_run_dir(str(tmp_path / 'out'), 'koniq-10k-swin_20260101_000000')
    second = runs.make_run_dir(str(tmp_path / 'out'), 'koniq-10k-swin_20260101_000000')
    third = runs.make_run_dir(str(tmp_path / 'out'), 'koniq-10k-swin_20260101_000000')
    assert [name for _, name in (first, second, third)] == [
        'koniq-10k-swin_20260101_000000', 'koniq-10k-swin_20260101_000000_2', 'koniq-10k-swin_20260101_000000_3']
    assert all(os.path.isdir(path) and os.path.basename(path) == name for path, name in (first, second, third))


def test_resume_file_is_found_in_the_run_folder_or_its_newest_round(tmp_path):
    run = tmp_path / 'run'
    (run / 'round1').mkdir(parents=True)
    (run / 'round2').mkdir()
    (run / 'round1' / 'last.pkl').write_bytes(b'1')
    os.utime(run / 'round1' / 'last.pkl', (1, 1))
    (run / 'round2' / 'last.pkl').write_bytes(b'2')
    found = runs.find_resume_file(str(run), '--resume_from')
    assert found == str(run / 'round2' / 'last.pkl')
    assert runs.resumed_run_dir(found, train_test_num=2) == str(run)
    with pytest.raises(SystemExit, match=r'--resume_from .*empty.*does not exist.*after its first epoch'):
        runs.find_resume_file(str(tmp_path / 'empty'), '--resume_from')


def test_resume_args_take_the_runs_config_except_machine_flags():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--resume', default=None)
    args = parser.parse_args(['--lr', '0.5', '--device', 'cpu', '--resume', 'run'])
    ignored = runs.resume_args(args, parser, {'lr': 2e-5, 'device': 'cuda', 'resume': None},
                                      machine_flags=('device',), resume_flag='resume')
    assert args.lr == 2e-5            # the experiment is the stored one ...
    assert args.device == 'cpu'       # ... on the machine given now
    assert ignored == ['lr']          # and the caller reports the experiment flag it ignored


# --------------------------------------------------------------------------- files of earlier versions

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


@pytest.mark.parametrize('name, fmt, epoch', [('swin_best_f346b1c.pkl', checkpoints.SWIN_FORMAT, 1),
                                              ('swin_last_f346b1c.pkl', checkpoints.SWIN_FORMAT, 3),
                                              ('clip_best_f346b1c.pkl', checkpoints.CLIP_FORMAT, 1),
                                              ('clip_last_f346b1c.pkl', checkpoints.CLIP_FORMAT, 3)])
def test_checkpoints_written_by_the_f346b1c_trainers_still_load(name, fmt, epoch):
    loaded = load_checkpoint(os.path.join(FIXTURES, name))
    assert loaded['format'] == fmt and loaded['epoch'] == epoch and loaded['round'] == 1
    assert loaded['state_dict'] and all(torch.is_tensor(v) for v in loaded['state_dict'].values())
    assert isinstance(loaded['config'], dict) and isinstance(loaded['metrics'], dict)
    if fmt == checkpoints.CLIP_FORMAT:
        assert loaded['model_config']['clip_model'] == 'nano' and len(loaded['label_scales']) == 2
    if 'last' in name:
        assert loaded['optimizer']['param_groups'] and loaded['best']['epoch'] == 1
        assert loaded['early_stopping']['bad_epochs'] == 2   # CLIP's older 'bad_epochs' read the same way
        restore_rng_state(loaded['rng_state'])
