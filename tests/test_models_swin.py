"""Model behaviour a user relies on: shapes, the batched target net, gradients,
determinism, checkpoint compatibility and the offline-weights message."""
import socket
import urllib.error

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import models_swin
from models_swin import build_model, infer_model_config


def nano(multiscale=True, attention=True, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model('nano', use_multiscale=multiscale, use_attention=attention, pretrained=False, **kw)


@pytest.fixture(scope='module')
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 224, 224)


@pytest.mark.parametrize('multiscale,attention', [(True, True), (True, False), (False, False)])
def test_nano_fusion_modes_give_one_score_per_image(images, multiscale, attention):
    model = nano(multiscale, attention).eval()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (3,)
    assert torch.isfinite(out).all()
    if attention:
        w = model.last_attention_weights
        assert w.shape == (3, 4)
        assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize('size,stage4,n_params_m', [
    ('tiny', 768, 29.5), ('small', 768, 50.8), ('base', 1024, 89.1), ('resnet50', 2048, 29.7)])
def test_real_sizes_build_with_expected_widths(size, stage4, n_params_m):
    torch.manual_seed(0)
    model = build_model(size, use_multiscale=True, use_attention=True, pretrained=False).eval()
    assert model.multiscale_attention.attention_net[0].in_features == stage4
    assert models_swin.count_parameters(model) / 1e6 == pytest.approx(n_params_m, abs=0.2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1,)
    assert infer_model_config(model.state_dict()) == dict(
        model_size=size, use_multiscale=True, use_attention=True)


def test_attention_without_multiscale_is_refused_with_reason():
    with pytest.raises(ValueError, match='use_attention=True needs use_multiscale=True'):
        nano(multiscale=False, attention=True)


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match='model_size must be one of nano, tiny'):
        build_model('huge', pretrained=False)


def grouped_conv_target_net(target_in, weights, biases):
    """The user's original TargetFC: grouped 1x1 convs over (1, B*C, 1, 1)."""
    b = target_in.shape[0]
    q = target_in.reshape(b, -1, 1, 1)
    for i, (w, bias) in enumerate(zip(weights, biases)):
        out_ch = w.shape[1]
        q = F.conv2d(q.reshape(1, -1, 1, 1), w.reshape(b * out_ch, -1, 1, 1), bias.reshape(-1), groups=b)
        q = q.reshape(b, out_ch, 1, 1)
        if i < 4:
            q = torch.sigmoid(q)
    return q.reshape(b)


def test_batched_target_net_equals_per_image_loop_and_original_grouped_conv(images):
    model = nano().eval()
    with torch.no_grad():
        feats = model.swin.stage_features(images)
        target_in = models_swin._lda_vector(model.swin, feats)
        hyper = model.conv1(model.hyper_features(feats))
        weights, biases = model.target_params(hyper)
        batched = model.target_net(target_in, weights, biases)
        looped = torch.stack([
            model.target_net(target_in[i:i + 1], [w[i:i + 1] for w in weights], [b[i:i + 1] for b in biases])[0]
            for i in range(3)])
        original = grouped_conv_target_net(target_in, weights, biases)
    assert torch.allclose(batched, looped, atol=1e-6)
    assert torch.allclose(batched, original, atol=1e-5)
    assert torch.allclose(batched, model(images), atol=1e-6)


def test_generated_weight_shapes_follow_hyperiqa(images):
    model = nano().eval()
    with torch.no_grad():
        feats = model.swin.stage_features(images)
        weights, biases = model.target_params(model.conv1(model.hyper_features(feats)))
    assert [tuple(w.shape) for w in weights] == [(3, 112, 224), (3, 56, 112), (3, 28, 56), (3, 14, 28), (3, 1, 14)]
    assert [tuple(b.shape) for b in biases] == [(3, 112), (3, 56), (3, 28), (3, 14), (3, 1)]


def test_batch_of_one_works_in_train_and_eval(images):
    model = nano()
    assert model.train()(images[:1]).shape == (1,)
    with torch.no_grad():
        assert model.eval()(images[:1]).shape == (1,)


def test_gradients_reach_backbone_lda_attention_and_hypernet(images):
    model = nano().train()
    model(images[:2]).sum().backward()
    for name in ('swin.backbone.patch_embed.proj.weight', 'swin.backbone.layers_0.blocks.0.attn.qkv.weight',
                 'swin.lda1_fc.weight', 'swin.lda4_fc.weight', 'multiscale_attention.attention_net.0.weight',
                 'conv1.0.weight', 'fc1w_conv.weight', 'fc4w_conv.weight', 'fc5w_fc.weight', 'fc5b_fc.bias'):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_independent_of_batch_mates(images):
    model = nano().eval()
    with torch.no_grad():
        together = model(images)
        again = model(images)
        alone = model(images[1:2])
    assert torch.equal(together, again)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_train_mode_dropout_changes_scores_eval_does_not(images):
    model = nano(dropout_rate=0.5).train()
    torch.manual_seed(0)
    a = model(images[:2])
    b = model(images[:2])
    assert not torch.allclose(a, b)


def test_resnet50_trains_without_dropout_like_the_original_hyperiqa(images):
    # Original HyperIQA: score = target_net(lda vector, weights from conv1(stage-4 features)),
    # no dropout anywhere. Computed here by hand in train mode (BatchNorm uses batch statistics,
    # which is deterministic for a fixed batch) and compared with the model's own forward.
    torch.manual_seed(0)
    model = build_model('resnet50', use_multiscale=False, pretrained=False, dropout_rate=0.3).train()
    x = images[:2]
    with torch.no_grad():
        torch.manual_seed(5)
        scores = model(x)
        feats = model.res.stage_features(x)
        hyper = model.conv1(F.adaptive_avg_pool2d(feats[3], 7))
        weights, biases = model.target_params(hyper)
        q = models_swin._lda_vector(model.res, feats)
        for i, (w, b) in enumerate(zip(weights, biases)):
            q = torch.einsum('boi,bi->bo', w, q) + b
            q = torch.sigmoid(q) if i < 4 else q
    assert torch.allclose(scores, q[:, 0], atol=1e-6, rtol=0)


def test_parameter_groups_split_backbone_from_heads():
    model = nano()
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert not backbone & head
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert id(model.swin.lda1_fc.weight) in backbone  # as the original solver: lr for all of `swin`
    assert id(model.fc1w_conv.weight) in head and id(model.multiscale_attention.attention_net[0].weight) in head


def test_state_dict_uses_the_original_module_names():
    keys = set(nano().state_dict())
    for key in ('swin.backbone.patch_embed.proj.weight', 'swin.backbone.layers_3.blocks.1.mlp.fc2.bias',
                'swin.lda1_pool.0.weight', 'swin.lda1_fc.weight', 'swin.lda4_fc.bias',
                'multiscale_attention.attention_net.0.weight', 'multiscale_attention.attention_net.3.bias',
                'conv1.0.weight', 'conv1.4.bias', 'fc1w_conv.weight', 'fc1b_fc.bias', 'fc4w_conv.weight',
                'fc5w_fc.weight', 'fc5b_fc.bias'):
        assert key in keys, key


def test_resnet50_layout_matches_original_hyperiqa_release():
    torch.manual_seed(0)
    model = build_model('resnet50', use_multiscale=False, pretrained=False)
    keys = set(model.state_dict())
    for key in ('res.conv1.weight', 'res.bn1.running_mean', 'res.layer1.0.downsample.0.weight',
                'res.layer4.2.conv3.weight', 'res.lda1_pool.0.weight', 'res.lda4_fc.weight',
                'conv1.0.weight', 'fc5b_fc.bias'):
        assert key in keys, key
    assert not any(k.startswith('swin.') or k.startswith('res.fc.') for k in keys)
    assert model.conv1[0].in_channels == 2048 and model.conv1[0].out_channels == 1024
    assert infer_model_config(model.state_dict()) == dict(
        model_size='resnet50', use_multiscale=False, use_attention=False)


def test_state_dict_round_trip_reproduces_predictions(images, tmp_path):
    source = nano(seed=0).eval()
    path = tmp_path / 'best_model_srcc_0.9000_plcc_0.9100.pkl'
    torch.save(source.state_dict(), path)
    target = nano(seed=123).eval()
    with torch.no_grad():
        assert not torch.allclose(source(images), target(images))
        target.load_state_dict(torch.load(path, weights_only=True), strict=True)
        assert torch.equal(source(images), target(images))


def test_ddp_prefixed_and_old_timm_buffers_still_load_strictly(images):
    source = nano(seed=0).eval()
    legacy = {'module.' + k: v for k, v in source.state_dict().items()}
    # Older timm versions saved these buffers; they are rebuilt at construction.
    legacy['module.swin.backbone.layers_0.blocks.0.attn.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    target = nano(seed=5).eval()
    target.load_state_dict(legacy, strict=True)
    with torch.no_grad():
        assert torch.equal(source(images), target(images))


@pytest.mark.parametrize('multiscale,attention', [(True, True), (True, False), (False, False)])
def test_infer_model_config_from_bare_state_dict(multiscale, attention):
    sd = nano(multiscale, attention).state_dict()
    assert infer_model_config(sd) == dict(model_size='nano', use_multiscale=multiscale, use_attention=attention)


def test_infer_model_config_rejects_foreign_state_dict():
    with pytest.raises(ValueError, match='not a HyperIQA state_dict'):
        infer_model_config({'fc.weight': torch.zeros(2, 2)})


def test_offline_pretrained_error_names_both_ways_out(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty-hf-cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-hf-cache'))
    with pytest.raises(models_swin.PretrainedWeightsError) as err:
        build_model('tiny', pretrained=True)
    message = str(err.value)
    assert 'swin_tiny_patch4_window7_224' in message
    assert '--pretrained_path' in message and '--no_pretrained' in message


def test_unresolvable_hub_fails_at_once_without_retries(monkeypatch, tmp_path):
    """No DNS (an offline node without HF_HUB_OFFLINE set): the message comes without the
    hub client's retry back-off, and the offline switch is put back afterwards."""
    import time
    import huggingface_hub.constants
    for name in models_swin._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'empty-hf-cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-hf-cache'))

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, 'Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    waits = []
    monkeypatch.setattr(time, 'sleep', waits.append)
    with pytest.raises(models_swin.PretrainedWeightsError) as err:
        build_model('tiny', pretrained=True)
    assert waits == []
    assert '--pretrained_path' in str(err.value) and '--no_pretrained' in str(err.value)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_a_proxy_skips_the_name_lookup(monkeypatch):
    monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')
    monkeypatch.setattr(socket, 'getaddrinfo', lambda *a, **k: pytest.fail('looked the hub up despite a proxy'))
    assert models_swin._hub_host_unresolvable() is False


def test_offline_resnet50_error_names_both_ways_out(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, 'get_state_dict', no_network)
    with pytest.raises(models_swin.PretrainedWeightsError, match='--no_pretrained'):
        build_model('resnet50', pretrained=True)


def test_local_weights_file_initialises_the_backbone(tmp_path):
    torch.manual_seed(7)
    classifier = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)
    path = tmp_path / 'swin_tiny_imagenet.pth'
    torch.save(classifier.state_dict(), path)
    model = build_model('tiny', pretrained=True, pretrained_path=str(path))
    assert torch.equal(model.swin.backbone.patch_embed.proj.weight, classifier.patch_embed.proj.weight)
    assert torch.equal(model.swin.backbone.layers_3.blocks[1].mlp.fc2.weight, classifier.layers[3].blocks[1].mlp.fc2.weight)


def test_unreadable_local_weights_file_is_named(tmp_path):
    path = tmp_path / 'broken.pth'
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(models_swin.PretrainedWeightsError, match='broken.pth'):
        build_model('tiny', pretrained=True, pretrained_path=str(path))
