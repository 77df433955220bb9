"""Fast self-checks of the PyTorch oracle (CPU, tiny shapes).

They pin the oracle's own contract (state-dict names, shapes, loss keys, the
valid-concept rule) so that a test of the Flax code that fails can be blamed on
the Flax code. Parameter counts are checked against the numbers torchvision
publishes for its Kinetics-400 checkpoints, an independent source.
"""

import math

import pytest
import torch

from tests.torch_reference.cvc_model import (
    LOSS_KEYS, TorchCVC, loss_terms, push_to_queue, sinkhorn, valid_concept_mask)
from tests.torch_reference.video_resnet import TorchHaraResNet, TorchVideoResNet

# Tiny configuration shared by the model-level tests.
WIDTH, FRAMES, SIZE, BATCH, K = 8, 4, 32, 3, 4
D = 8 * WIDTH  # encoder output width of an 18-layer basic-block network


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run these tiny models on one thread: at these sizes intra-op threading is
    pure overhead (tens of times slower on small shared CPUs). Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _shapes(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch, n_params", [
    ("r3d", 33_371_472), ("mc3", 11_695_440), ("r2plus1d", 31_505_325)])
def test_torchvision_parameter_counts(arch, n_params):
    # torchvision's published num_params of r3d_18 / mc3_18 / r2plus1d_18 (400 classes).
    model = TorchVideoResNet(arch, num_classes=400)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_torchvision_key_samples():
    r2p1d = _shapes(TorchVideoResNet("r2plus1d"))
    expected = {
        "stem.0.weight": (45, 3, 1, 7, 7),
        "stem.1.running_var": (45,),
        "stem.3.weight": (64, 45, 3, 1, 1),
        "stem.4.bias": (64,),
        "layer1.0.conv1.0.0.weight": (144, 64, 1, 3, 3),
        "layer1.0.conv1.0.1.weight": (144,),
        "layer1.0.conv1.0.3.weight": (64, 144, 3, 1, 1),
        "layer1.0.conv1.1.weight": (64,),
        "layer1.1.conv2.0.3.weight": (64, 144, 3, 1, 1),
        "layer1.1.conv2.1.num_batches_tracked": (),
        # torchvision's quirk: conv2 reuses the mid width computed from the block input.
        "layer2.0.conv1.0.0.weight": (230, 64, 1, 3, 3),
        "layer2.0.conv2.0.0.weight": (230, 128, 1, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.1.weight": (512,),
    }
    for key, shape in expected.items():
        assert r2p1d[key] == shape, key
    assert "layer1.0.downsample.0.weight" not in r2p1d
    assert not any(k.startswith("fc.") for k in r2p1d)

    r3d = _shapes(TorchVideoResNet("r3d"))
    assert r3d["stem.0.weight"] == (64, 3, 3, 7, 7)
    assert r3d["layer1.0.conv1.0.weight"] == (64, 64, 3, 3, 3)
    assert r3d["layer3.1.conv2.0.weight"] == (256, 256, 3, 3, 3)

    mc3 = TorchVideoResNet("mc3")
    assert _shapes(mc3)["layer1.0.conv1.0.weight"] == (64, 64, 3, 3, 3)
    assert _shapes(mc3)["layer2.0.conv1.0.weight"] == (128, 64, 1, 3, 3)
    assert mc3.layer2[0].downsample[0].stride == (1, 2, 2)

    bottleneck = _shapes(TorchVideoResNet("r3d", blocks=(3, 4, 6, 3), bottleneck=True))
    assert bottleneck["layer1.0.conv1.0.weight"] == (64, 64, 1, 1, 1)
    assert bottleneck["layer1.0.conv3.0.weight"] == (256, 64, 1, 1, 1)
    assert bottleneck["layer1.0.conv3.1.weight"] == (256,)
    assert bottleneck["layer1.0.downsample.0.weight"] == (256, 64, 1, 1, 1)
    assert bottleneck["layer3.5.conv2.0.weight"] == (256, 256, 3, 3, 3)


def test_hara_key_samples():
    r18 = _shapes(TorchHaraResNet(18))
    assert r18["conv1.weight"] == (64, 3, 7, 7, 7)
    assert r18["bn1.running_mean"] == (64,)
    assert r18["layer1.0.conv1.weight"] == (64, 64, 3, 3, 3)
    assert r18["layer1.1.bn2.bias"] == (64,)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1, 1)
    assert r18["layer2.0.downsample.1.num_batches_tracked"] == ()
    assert "layer1.0.downsample.0.weight" not in r18

    r50 = _shapes(TorchHaraResNet(50))
    assert r50["layer1.0.conv3.weight"] == (256, 64, 1, 1, 1)
    assert r50["layer1.0.bn3.weight"] == (256,)
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1, 1)
    assert r50["layer3.5.conv2.weight"] == (256, 256, 3, 3, 3)
    assert r50["layer4.2.bn3.running_var"] == (2048,)


@pytest.mark.parametrize("make, map_shape", [
    (lambda: TorchVideoResNet("r2plus1d", width=WIDTH), (D, 1, 2, 2)),
    (lambda: TorchVideoResNet("r3d", width=WIDTH), (D, 1, 2, 2)),
    (lambda: TorchVideoResNet("mc3", width=WIDTH), (D, FRAMES, 2, 2)),
    (lambda: TorchVideoResNet("r3d", width=WIDTH, bottleneck=True), (4 * D, 1, 2, 2)),
    (lambda: TorchHaraResNet(18, width=WIDTH), (D, 1, 1, 1)),
    (lambda: TorchHaraResNet(18, width=WIDTH, no_max_pool=True), (D, 1, 2, 2)),
])
def test_encoder_output_shapes(make, map_shape):
    torch.manual_seed(0)
    pooled, fmap = make()(torch.randn(BATCH, 3, FRAMES, SIZE, SIZE))
    assert tuple(fmap.shape) == (BATCH, *map_shape)
    assert tuple(pooled.shape) == (BATCH, map_shape[0])
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3, 4)))


# ---------------------------------------------------------------------------
# Pretraining model
# ---------------------------------------------------------------------------

def _tiny_cvc(**kwargs):
    torch.manual_seed(0)
    defaults = dict(dim=D, concepts=K, sigma="mlp", sigma_dim=32, decoder_hidden=16,
                    proj_hidden=32, proj_dim=16, queue_size=12)
    defaults.update(kwargs)
    return TorchCVC(TorchVideoResNet("r2plus1d", width=WIDTH), **defaults)


def _views():
    torch.manual_seed(1)
    return torch.randn(BATCH, 6, 3, FRAMES, SIZE, SIZE)


def test_cvc_state_dict_names_reference_config():
    """With sigma='mlp' and hidden decoders, the head keys are exactly the reference's."""
    keys = {k for k in _tiny_cvc().state_dict() if not k.startswith("backbone.")}
    expected = {"queue", "prototype.weight", "prototype_s.weight", "prototype_d.weight"}
    for name in ("fvv", "fvs", "fvd", "fsv", "fdv"):
        expected |= {f"{name}.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for name in ("fv", "fs", "fd", "gv", "gs", "gd"):
        expected |= {f"{name}.0.weight", f"{name}.0.bias", f"{name}.3.weight", f"{name}.3.bias"}
        expected |= {f"{name}.1.{p}" for p in bn}
    expected |= {f"lit.{m}.weight" for m in ("project_q", "project_k", "project_v")}
    expected |= {f"lit.{m}.{p}" for m in ("norm_inputs", "norm_templates", "norm_mlp")
                 for p in ("weight", "bias")}
    expected |= {f"lit.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert keys == expected


def test_cvc_shapes_and_variants():
    shapes = _shapes(_tiny_cvc())
    assert shapes["queue"] == (12, 6, 2 * K)
    assert shapes["prototype.weight"] == (2 * K, 32)
    assert shapes["gv.0.weight"] == (16, 2 * K)
    assert shapes["gs.3.weight"] == (D, 16)
    assert shapes["lit.project_k.weight"] == (32, D)
    assert shapes["lit.mlp.0.weight"] == (16, 32)
    assert shapes["fvv.2.weight"] == (16, 32)
    assert shapes["backbone.layer1.0.conv1.0.0.weight"][1:] == (WIDTH, 1, 3, 3)

    identity = _shapes(_tiny_cvc(sigma="identity", decoder_hidden=0))
    assert not any(k.split(".")[0] in ("fv", "fs", "fd") for k in identity)
    assert identity["prototype_d.weight"] == (2 * K, D)  # sigma_dim forced to D
    assert identity["gv.weight"] == (D, 2 * K) and identity["gd.weight"] == (D, K)

    linear = _shapes(_tiny_cvc(sigma="linear"))
    assert linear["fv.weight"] == (32, D) and linear["fs.bias"] == (32,)


def test_loss_terms_keys_finite_and_backward():
    model = _tiny_cvc().train()
    views = _views()
    queue = torch.randn(12, 6, 2 * K)
    floats, tensors = loss_terms(model, views, queue=queue, epoch=1, loc_start_epoch=1,
                                 topk=2, return_tensors=True)
    assert set(floats) == set(LOSS_KEYS) and len(floats) == 14
    assert all(math.isfinite(v) for v in floats.values()), floats
    expected_total = (sum(floats[k] for k in ("I_vv", "I_vs", "I_vd", "align_s", "align_d",
                                             "rec_v", "rec_s", "rec_d", "loc_v", "loc_s", "loc_d"))
                      + 0.1 * (floats["entropy_s"] + floats["entropy_d"]))
    assert floats["total"] == pytest.approx(expected_total, rel=1e-5)
    assert tuple(tensors["codes"].shape) == (BATCH, 6, 2 * K)
    tensors["total"].backward()
    assert model.lit.project_q.weight.grad is not None        # local term is in the total
    assert model.prototype_s.weight.grad.abs().sum() > 0

    # Before loc_start_epoch the local terms are computed but left out of the total.
    early = loss_terms(model, views, queue=queue, epoch=1, loc_start_epoch=2, topk=2)
    local = early["loc_v"] + early["loc_s"] + early["loc_d"]
    assert early["total"] == pytest.approx(floats["total"] - local, rel=1e-5)

    # The queue only enters the Sinkhorn targets from epoch 1 on.
    e0_q = loss_terms(model, views, queue=queue, epoch=0, topk=2)
    e0 = loss_terms(model, views, queue=None, epoch=0, topk=2)
    assert e0_q["align_s"] == pytest.approx(e0["align_s"], rel=1e-6)
    assert early["align_s"] != pytest.approx(e0["align_s"], rel=1e-6)

    assert torch.equal(push_to_queue(queue, tensors["codes"])[-BATCH:], tensors["codes"])


def test_valid_mask_keeps_k_minus_one_without_ties():
    torch.manual_seed(0)
    scores = torch.randn(5, 2 * K)  # continuous values: no ties
    for k in (1, 2, 3):
        strict = valid_concept_mask(scores, scores, topk=k, strict=True)
        assert strict.sum(dim=1).tolist() == [k - 1] * 5
        exact = valid_concept_mask(scores, scores, topk=k, strict=False)
        assert exact.sum(dim=1).tolist() == [k] * 5
        assert torch.all(exact >= strict)
    # Two different views: the mask is the intersection of the two selections.
    other = torch.randn(5, 2 * K)
    both = valid_concept_mask(scores, other, topk=3, strict=False)
    top_a = torch.zeros_like(scores).scatter_(1, scores.topk(3).indices, 1)
    top_b = torch.zeros_like(other).scatter_(1, other.topk(3).indices, 1)
    torch.testing.assert_close(both, top_a * top_b)


def test_sinkhorn_columns_are_distributions():
    torch.manual_seed(0)
    out = sinkhorn(torch.randn(10, K))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(10))
    assert torch.all(out >= 0)
