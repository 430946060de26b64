"""Decisions of the CUDA paths taken as pure functions, tested on the CPU (issue 20)."""
import sys

import pytest
import torch

import cross_dataset_test
import models_swin
from iqa import runtime


def test_idle_gpus_warning_names_torchrun():
    assert runtime.idle_gpus_warning(0, 1) is None
    assert runtime.idle_gpus_warning(1, 1) is None
    assert runtime.idle_gpus_warning(2, 2) is None
    message = runtime.idle_gpus_warning(2, 1)
    assert 'torchrun --nproc_per_node 2' in message and '1 GPU(s) stay idle' in message
    assert 'CUDA_VISIBLE_DEVICES' in message
    assert '4 GPUs are visible but 2 processes run' in runtime.idle_gpus_warning(4, 2)


def test_both_trainers_warn_at_start_up(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    warnings = []
    runtime.warn_idle_gpus(torch.device('cuda', 0), 1, warnings.append)
    runtime.warn_idle_gpus(torch.device('cpu'), 1, warnings.append)   # no GPU in use: nothing to say
    assert len(warnings) == 1 and 'torchrun' in warnings[0]
    for script in ('train_swin.py', 'train_clip.py'):
        text = open(script).read()
        assert 'runtime.warn_idle_gpus(device, world, warnings.append)' in text


def test_channels_last_for_resnet50_on_cuda_only():
    seen = []
    resnet = models_swin.build_model('resnet50', pretrained=False)
    resnet.res.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    assert models_swin.use_channels_last(resnet, torch.device('cpu')) is False
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = resnet.eval()(x)
    assert seen == [False]
    assert models_swin.use_channels_last(resnet, torch.device('cuda', 0)) is True   # switches, runs on any device
    assert resnet.res.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        after = resnet(x)
    assert seen == [False, True]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)   # the same function of the input
    assert models_swin.use_channels_last(models_swin.build_model('nano', pretrained=False),
                                         torch.device('cuda', 0)) is False
    assert 'models_swin.use_channels_last(model, device)' in open('train_swin.py').read()


@pytest.mark.parametrize('config,no_amp,device,expected', [
    ({'precision': 'fp32'}, False, 'cuda', False),
    ({'precision': 'auto', 'no_amp': True}, False, 'cuda', False),
    ({'precision': 'auto'}, False, 'cuda', True),
    ({'precision': 'bf16'}, False, 'cuda', True),
    ({'precision': 'bf16'}, True, 'cuda', False),   # --no_amp overrides
    ({'precision': 'bf16'}, False, 'cpu', False),
    ({}, False, 'cuda', False),                       # the original code's checkpoints: fp32, as it evaluated
])
def test_cross_dataset_scores_in_the_checkpoints_precision(config, no_amp, device, expected):
    ckpt = {'config': config, 'state_dict': {}}
    assert cross_dataset_test.checkpoint_amp(ckpt, torch.device(device), no_amp) is expected


def test_a_timed_out_ddp_check_kills_its_process_group(tmp_path):
    sys.path.insert(0, 'benchmarks')
    import gpu_check
    child = tmp_path / 'child.pid'
    script = f'import os, subprocess, sys, time\n' \
             f'p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n' \
             f'open({str(child)!r}, "w").write(str(p.pid))\ntime.sleep(60)\n'
    with pytest.raises(AssertionError, match='killed'):
        gpu_check.run_group([sys.executable, '-c', script], timeout=3)
    pid = int(child.read_text())
    import os
    import time
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f'/proc/{pid}/stat') as f:
            if f.read().split()[2] == 'Z':
                break
        time.sleep(0.1)
    else:
        pytest.fail('the worker outlived the timed-out check')
