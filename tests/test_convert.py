"""PyTorch <-> Flax: encoders and the full model against the PyTorch oracle.

The oracle (tests/torch_reference) is an independent PyTorch implementation with
the state-dict names of torchvision, Hara's 3D-ResNets and the authors' model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import reference, ucf101
from cvc_jax import convert
from cvc_jax import pretrain
from tests.torch_reference import cvc_model
from tests.torch_reference.video_resnet import TorchHaraResNet, TorchVideoResNet


@pytest.fixture(autouse=True)
def _one_torch_thread():
  # torch's threaded conv3d is far slower than one thread on tiny inputs here.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _randomize_bn_stats(model, seed=0):
  """Eval-mode parity must exercise the running statistics and affine terms."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.BatchNorm1d)):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return model


def _relerr(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max()))


ENCODERS = {
    "r2plus1d_18": lambda: TorchVideoResNet("r2plus1d", (2, 2, 2, 2)),
    "r2plus1d_1111": lambda: TorchVideoResNet("r2plus1d", (1, 1, 1, 1)),
    "r3d_18": lambda: TorchVideoResNet("r3d", (2, 2, 2, 2)),
    "mc3_18": lambda: TorchVideoResNet("mc3", (2, 2, 2, 2)),
    "hara_r3d_34": lambda: TorchHaraResNet(34),
    "r2plus1d_bottleneck_tiny": lambda: TorchVideoResNet("r2plus1d", (1, 1, 1, 1), width=8,
                                                         bottleneck=True),
    "hara_r3d_50_tiny": lambda: TorchHaraResNet(50, width=8),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_from_torch_matches_pytorch(name):
  torch.manual_seed(0)
  net = _randomize_bn_stats(ENCODERS[name]()).eval()
  x = torch.randn(2, 3, 8, 32, 32)
  with torch.no_grad():
    want_pooled, want_map = net(x)
  module, variables = convert.encoder_from_torch(net.state_dict())
  pooled, fmap = jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()))
  assert _relerr(pooled, want_pooled.numpy()) <= 1e-4
  assert _relerr(fmap, want_map.permute(0, 2, 3, 4, 1).numpy()) <= 1e-4

  # And back: every tensor round-trips bit for bit and loads strictly.
  enc_cfg = convert.infer_encoder_config(net.state_dict())
  back = convert.encoder_to_torch(variables, enc_cfg)
  original = {k: v.numpy() for k, v in net.state_dict().items()
              if not k.endswith("num_batches_tracked")}
  assert set(back) - {k for k in back if k.endswith("num_batches_tracked")} == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)


def test_encoder_architecture_is_read_from_the_keys():
  read = lambda net: convert.infer_encoder_config(net.state_dict())
  assert read(TorchVideoResNet("r2plus1d", (1, 1, 1, 1), width=8)) == dict(
      arch="r2plus1d", blocks=(1, 1, 1, 1), width=8, bottleneck=False)
  assert read(TorchVideoResNet("mc3", (2, 2, 2, 2), width=8))["arch"] == "mc3"
  assert read(TorchVideoResNet("r3d", (3, 4, 6, 3), width=8))["blocks"] == (3, 4, 6, 3)
  assert read(TorchHaraResNet(34, width=8, conv1_t_size=3)) == dict(
      arch="hara", depth=34, width=8, conv1_t_size=3)


def test_bad_encoder_checkpoint_names_the_key():
  sd = TorchVideoResNet("r3d", (1, 1, 1, 1), width=8).state_dict()
  missing = {k: v for k, v in sd.items() if k != "layer2.0.conv2.1.running_var"}
  with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.1\.running_var"):
    convert.encoder_from_torch(missing)
  bad = dict(sd)
  bad["layer3.0.conv1.0.weight"] = torch.zeros(32, 16, 3, 3, 2)
  with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.0\.weight.*\(32, 16, 3, 3, 2\)"):
    convert.encoder_from_torch(bad)
  with pytest.raises(ValueError, match="Not a video ResNet"):
    convert.encoder_from_torch({"foo.weight": torch.zeros(3)})


def _tiny_torch_cvc(config, seed=0):
  m, enc = config.model, config.model.encoder
  torch.manual_seed(seed)
  net = TorchVideoResNet(enc.arch, tuple(enc.blocks), width=enc.width)
  model = cvc_model.TorchCVC(
      net, dim=8 * enc.width, concepts=m.num_concepts, sigma=m.sigma, sigma_dim=m.sigma_dim,
      decoder_hidden=m.decoder_hidden, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim,
      queue_size=config.loss.queue_size)
  model.normalize_prototypes_()  # as the train loop does before every step
  return model.train()


def _views(config, batch=4, seed=1):
  g = torch.Generator().manual_seed(seed)
  t, s = config.input.num_frames, config.input.crop_size
  return torch.randn(batch, 6, 3, t, s, s, generator=g)


@pytest.mark.parametrize("config_module,epoch", [
    (reference, 0), (reference, 12), (ucf101, 0), (ucf101, 6)])
def test_all_terms_match_the_pytorch_oracle(config_module, epoch):
  """SPEC 4, term by term: epoch 0 (no queue, no L_loc in the total) and an epoch
  past both switches (queue on, L_loc on), through `from_torch`."""
  config = config_module.get_config("runlocal")
  model = _tiny_torch_cvc(config)
  views = _views(config)
  queue = torch.tanh(torch.randn(config.loss.queue_size, 6, 2 * config.model.num_concepts))
  variables = convert.from_torch(
      {f"module.{k}": v for k, v in model.state_dict().items()}, config)
  np.testing.assert_array_equal(variables["queue"], model.queue.numpy())
  got = pretrain.loss_terms(variables, views.permute(0, 1, 3, 4, 5, 2).numpy(), config,
                            queue=queue.numpy(), epoch=epoch)
  lc = config.loss
  want = cvc_model.loss_terms(model, views, queue=queue, epoch=epoch,
                              loc_start_epoch=lc.loc_start_epoch, topk=lc.loc_topk,
                              strict=lc.loc_topk_strict)
  for name in pretrain.TERMS + ("total",):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_bad_full_checkpoint_names_the_key():
  config = reference.get_config("runlocal")
  sd = _tiny_torch_cvc(config).state_dict()
  with pytest.raises(ValueError, match=r"'lit\.project_k\.weight'"):
    convert.from_torch({k: v for k, v in sd.items() if k != "lit.project_k.weight"}, config)
  wrong = dict(sd, **{"gs.0.weight": torch.zeros(32, 7)})
  with pytest.raises(ValueError, match=r"'gs\.0\.weight' has shape \(32, 7\)"):
    convert.from_torch(wrong, config)
  # A checkpoint of the MLP-sigma model does not fit the identity-sigma config.
  with pytest.raises(ValueError, match=r"'fd\.0\.bias' has no place.*config\.model"):
    convert.from_torch(sd, ucf101.get_config("runlocal"))


def test_load_state_dict_reads_pth_and_safetensors(tmp_path):
  sd = {k: v.numpy() for k, v in TorchVideoResNet("r3d", (1, 1, 1, 1), width=8)
        .state_dict().items()}
  convert.save_torch(sd, str(tmp_path / "enc.safetensors"))
  convert.save_torch(sd, str(tmp_path / "enc.pth"))
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}},
             tmp_path / "wrapped.pth")
  for name in ("enc.safetensors", "enc.pth", "wrapped.pth"):
    loaded = convert.load_state_dict(str(tmp_path / name))
    assert set(loaded) == set(sd), name
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])
