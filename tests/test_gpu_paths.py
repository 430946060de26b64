"""The CUDA code paths, exercised on the CPU: device identity, memory plan, precision,
NaN selection, DDP agreement on divergence, resume after an early-stopped round, compile
shapes and per-step host->device copies (issue 10). Each test failed before its fix."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import checkpoints
import data_loader
import run_setup
import train_swin
from test_train_swin import (free_port, koniq_root, only_run_dir, read_metrics,  # noqa: F401 (fixture)
                             scripted_evaluation, tiny_args, without_timing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- device identity

def test_a_bare_cuda_device_is_made_canonical(monkeypatch):
    """'cuda' and 'cuda:0' name the same GPU but compare unequal; the device the run uses
    is the canonical one, so tensors placed on it compare equal to it."""
    assert data_loader.canonical_device('cuda') == torch.device('cuda', 0)
    assert data_loader.canonical_device('cuda:1') == torch.device('cuda', 1)
    assert data_loader.canonical_device('cpu') == torch.device('cpu')
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert run_setup.setup_distributed('cuda') == (0, 1, torch.device('cuda', 0))


def test_host_images_that_do_not_fit_are_not_pinned_whole(monkeypatch):
    """A whole set pinned at once cost up to twice its size in page-locked memory (and a CUDA
    tensor cannot be pinned at all); batches are staged in small pinned buffers instead."""
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (1000, 10 ** 10))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    placed = data_loader.place_images(images, torch.device('cuda'))
    assert placed is images and not placed.is_pinned()


# --------------------------------------------------------------------------- NaN metrics

NAN = float('nan')


def test_a_nan_srcc_in_the_first_epoch_is_logged_never_selected(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[NAN, 0.5, 0.6], test_srccs=[NAN, 0.4, 0.45])
    assert train_swin.main(tiny_args(koniq_root, tmp_path)) == 0
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    assert [r['is_best'] for r in rows] == ['0', '1', '1']
    assert rows[0]['val_srcc'] == '' and rows[0]['test_srcc'] == ''
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['best_epoch'] == 3 and summary['status'] == 'finished'
    assert os.path.basename(summary['best_checkpoint']) == 'best_model_srcc_0.4500_plcc_0.4600.pkl'
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'epoch 1 has a NaN SRCC/PLCC' in log


def test_a_run_whose_every_epoch_is_nan_finishes_without_a_best(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[NAN, NAN], test_srccs=[0.3, NAN])
    assert train_swin.main(tiny_args(koniq_root, tmp_path, epochs=2)) == 0
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'finished' and summary['best'] is None and summary['best_checkpoint'] is None
    assert not [f for f in os.listdir(run_dir) if f.startswith('best_model')]
    assert [r['is_best'] for r in read_metrics(run_dir)] == ['0', '0']
