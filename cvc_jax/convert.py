"""PyTorch <-> Flax weights for the encoders and the authors' pretraining model.

Numpy in and out; torch is needed only to read `.pth` files, and then only with
`torch.load(weights_only=True)`, which never unpickles arbitrary objects.

Naming rule (shared with `cvc_jax.models`): a PyTorch key is split at its dots and
every all-digit part joins the part before it with "_", so
`backbone.layer1.0.conv1.0.0.weight` is `params/backbone/layer1_0/conv1_0_0/kernel`.
Leaves: conv weight [O, I, t, h, w] <-> kernel [t, h, w, I, O]; linear weight [O, I]
<-> kernel [I, O]; norm weight <-> scale; running_mean/var <-> batch_stats mean/var;
num_batches_tracked is dropped (written back as 0).
"""

import os
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cvc_jax import pretrain
from cvc_jax.models import cvc
from cvc_jax.models import resnet3d

_DIGITS = re.compile(r"^\d+$")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` or PyTorch `.pth`/`.pt` file into numpy arrays.

  A checkpoint that wraps its weights (`{'state_dict': ...}` or `{'model': ...}`)
  is unwrapped.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"Reading {path} needs PyTorch (pip install 'cvc_jax[torch]'), "
                      "or convert it to .safetensors first.") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def _as_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out


def _strip_prefix(state_dict, prefix):
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def _module_path(torch_path: str) -> tuple[str, ...]:
  """'layer1.0.conv1.0.0' -> ('layer1_0', 'conv1_0_0')."""
  parts = []
  for part in torch_path.split("."):
    if _DIGITS.match(part) and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts)


def _torch_path(flax_path: tuple[str, ...]) -> str:
  """('layer1_0', 'conv1_0_0') -> 'layer1.0.conv1.0.0'."""
  out = []
  for name in flax_path:
    pieces = name.split("_")
    merged = [pieces[0]]
    for piece in pieces[1:]:
      if _DIGITS.match(piece):
        merged.append("." + piece)
      else:
        merged.append("_" + piece)
    out.append("".join(merged))
  return ".".join(out)


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Maps a state dict onto Flax collections by the naming rule, no checks.

  Returns:
    {'params': ..., 'batch_stats': ..., and 'queue' if the dict has one}, nested
    dicts of numpy arrays.
  """
  sd = _strip_prefix(_as_numpy(state_dict), "module.")
  flat_params, flat_stats, extra = {}, {}, {}
  for key, value in sd.items():
    owner, _, leaf = key.rpartition(".")
    if not owner:  # a top-level buffer, such as the authors' concept queue
      extra[key] = value
      continue
    path = _module_path(owner)
    if leaf == "weight":
      if value.ndim == 5:
        flat_params[path + ("kernel",)] = np.transpose(value, (2, 3, 4, 1, 0))
      elif value.ndim == 2:
        flat_params[path + ("kernel",)] = value.T
      else:
        flat_params[path + ("scale",)] = value
    elif leaf == "bias":
      flat_params[path + ("bias",)] = value
    elif leaf == "running_mean":
      flat_stats[path + ("mean",)] = value
    elif leaf == "running_var":
      flat_stats[path + ("var",)] = value
    elif leaf == "num_batches_tracked":
      continue
    else:
      raise ValueError(f"Checkpoint key {key!r}: no Flax counterpart for a PyTorch "
                       f"tensor named {leaf!r}.")
  out = {"params": flax.traverse_util.unflatten_dict(flat_params),
         "batch_stats": flax.traverse_util.unflatten_dict(flat_stats)}
  out.update(extra)
  return out


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `torch_to_flax`: Flax collections to a PyTorch state dict."""
  sd = {}
  for path, value in flax.traverse_util.flatten_dict(dict(variables["params"])).items():
    value = np.asarray(value)
    owner, leaf = _torch_path(path[:-1]), path[-1]
    if leaf == "kernel":
      sd[f"{owner}.weight"] = (np.transpose(value, (4, 3, 0, 1, 2)) if value.ndim == 5
                               else value.T)
    elif leaf == "scale":
      sd[f"{owner}.weight"] = value
    else:
      sd[f"{owner}.{leaf}"] = value
  for path, value in flax.traverse_util.flatten_dict(
      dict(variables.get("batch_stats", {}))).items():
    owner = _torch_path(path[:-1])
    sd[f"{owner}.running_{path[-1]}"] = np.asarray(value)
    sd[f"{owner}.num_batches_tracked"] = np.zeros((), np.int64)
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def _check_against(variables, expected, prefix="", hint=""):
  """Raises a ValueError naming the first missing, unexpected or misshapen key."""
  for collection in ("params", "batch_stats"):
    got = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})))
    want = flax.traverse_util.flatten_dict(dict(expected.get(collection, {})))

    def name(path):
      as_torch = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                  "var": "running_var"}.get(path[-1], path[-1])
      return f"{prefix}{_torch_path(path[:-1])}.{as_torch}"

    for path in sorted(set(want) - set(got)):
      raise ValueError(f"Checkpoint is missing {name(path)!r} (shape "
                       f"{_torch_shape(want[path].shape)}), which the model needs.{hint}")
    for path in sorted(set(got) - set(want)):
      raise ValueError(f"Checkpoint key {name(path)!r} has no place in the model."
                       f"{hint}")
    for path in sorted(want):
      if tuple(got[path].shape) != tuple(want[path].shape):
        raise ValueError(
            f"Checkpoint key {name(path)!r} has shape {_torch_shape(got[path].shape)} "
            f"but the model expects {_torch_shape(want[path].shape)}.{hint}")


def _torch_shape(flax_shape):
  """The PyTorch shape of a Flax leaf's shape, for error messages."""
  s = tuple(flax_shape)
  if len(s) == 5:
    return (s[4], s[3], s[0], s[1], s[2])
  return s[::-1] if len(s) == 2 else s


def _blocks(sd):
  return tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{n}.")})
               for n in range(1, 5))


def infer_encoder_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Reads an encoder's architecture off its state-dict keys and shapes.

  torchvision layout (`stem.*`): R(2+1)D if the stem has a temporal conv
  `stem.3`, MC3 if stage 2 convolves space only, else R3D; blocks per stage and
  Bottlenecks from the layer keys. Hara layout (`conv1.weight`): depth from blocks
  and block type, temporal stem size from the kernel.
  """
  sd = state_dict
  blocks = _blocks(sd)
  bottleneck = any(".conv3" in k for k in sd)
  if "stem.0.weight" in sd:
    if "stem.3.weight" in sd:
      arch, width = "r2plus1d", sd["stem.3.weight"].shape[0]
    else:
      width = sd["stem.0.weight"].shape[0]
      # MC3's later stages convolve space only (the bottleneck's 3x3 is conv2).
      stage2 = sd.get(f"layer2.0.{'conv2' if bottleneck else 'conv1'}.0.weight")
      arch = "mc3" if stage2 is not None and stage2.shape[2] == 1 else "r3d"
    return dict(arch=arch, blocks=blocks, width=int(width), bottleneck=bottleneck)
  if "conv1.weight" in sd:
    table = {(b, d >= 50): d for d, b in resnet3d.DEPTH_TO_BLOCKS.items()}
    if (blocks, bottleneck) not in table:
      raise ValueError(f"Hara-layout checkpoint with blocks {blocks} "
                       f"({'Bottleneck' if bottleneck else 'BasicBlock'}) matches no depth "
                       f"of {sorted(resnet3d.DEPTH_TO_BLOCKS)}.")
    conv1 = sd["conv1.weight"]
    return dict(arch="hara", depth=table[(blocks, bottleneck)], width=int(conv1.shape[0]),
                conv1_t_size=int(conv1.shape[2]))
  raise ValueError("Not a video ResNet state dict: expected torchvision keys "
                   "('stem.0.weight', 'layer1.0...') or Hara keys ('conv1.weight', "
                   "'bn1.weight', ...), optionally under 'module.' or 'backbone.'.")


def encoder_from_torch(state_dict: Mapping[str, Any], **overrides):
  """A Flax encoder and its variables from a PyTorch encoder state dict.

  Accepts torchvision's video ResNets (any blocks per stage) and Hara's 3D-ResNets,
  also inside a full checkpoint (keys under `module.` and/or `backbone.`); a
  classifier `fc.*` is dropped.

  Args:
    state_dict: name -> tensor or array.
    **overrides: architecture options the keys cannot show (for Hara's layout:
      `conv1_t_stride`, `no_max_pool`, `pool_t`), and `dtype`.

  Returns:
    (module, variables): `module.apply(variables, x, train=False)` returns
    (pooled [B, D], feature_map [B, T', H', W', D]) for x [B, T, H, W, 3].
  """
  sd = _strip_prefix(_as_numpy(state_dict), "module.")
  if any(k.startswith("backbone.") for k in sd):
    sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  dtype = overrides.pop("dtype", jnp.float32)
  cfg = dict(infer_encoder_config(sd), **overrides)
  module = resnet3d.build_encoder(cfg, dtype=dtype)
  variables = torch_to_flax(sd)
  expected = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)), train=False))
  _check_against(variables, expected, hint=f" (architecture read from the keys: {cfg})")
  return module, _to_jnp(variables)


def _to_jnp(variables):
  return {c: jax.tree_util.tree_map(jnp.asarray, variables[c])
          for c in ("params", "batch_stats")}


def from_torch(state_dict: Mapping[str, Any], config) -> dict[str, Any]:
  """Variables of `CVCModel` from the authors' full pretraining checkpoint.

  Args:
    state_dict: their model's state dict, keys with or without the `module.`
      prefix of DataParallel; the `queue` buffer is carried over, the encoder's
      unused classifier `backbone.fc` is dropped.
    config: the config the model is built from (`configs/reference.py` matches
      their code); every key and shape is checked against it.

  Returns:
    {'params', 'batch_stats'} and, if the checkpoint has one, 'queue' [Q, 6, 2K].
  """
  # Their encoders carry an unused classifier (`backbone.fc`): nothing to load.
  sd = {k: v for k, v in _strip_prefix(_as_numpy(state_dict), "module.").items()
        if not re.match(r"^backbone(_s|_d)?\.fc\.", k)}
  variables = torch_to_flax(sd)
  model = cvc.build_model(config)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(pretrain.views_shape_of(config, batch=2)),
      train=False))
  _check_against(variables, expected,
                 hint=" Check config.model (encoder, num_concepts, sigma, decoder_hidden, "
                      "proj_*, separate_encoders) against the checkpoint.")
  out = _to_jnp(variables)
  if "queue" in variables:
    out["queue"] = jnp.asarray(variables["queue"])
  return out


def encoder_to_torch(variables: Mapping[str, Any], config) -> dict[str, np.ndarray]:
  """A torchvision- or Hara-layout state dict of an encoder's Flax variables.

  Args:
    variables: the encoder's {'params', 'batch_stats'}, or a full `CVCModel`'s
      (its `backbone` is taken).
    config: a full config (its `model.encoder` is used) or an encoder config; the
      variables are checked against it.

  Returns:
    name -> numpy array, loadable with `load_state_dict(strict=True)` into the
    PyTorch encoder of that layout without a classifier.
  """
  enc_cfg = config.model.encoder if hasattr(config, "model") else config
  if "backbone" in variables["params"]:
    variables = {c: variables[c]["backbone"] for c in ("params", "batch_stats")
                 if c in variables}
  module = resnet3d.build_encoder(enc_cfg)
  expected = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4, 32, 32, 3)), train=False))
  _check_against(variables, expected, hint=" The variables do not fit the encoder config.")
  return flax_to_torch(variables)


def save_torch(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a state dict as `.safetensors` (always possible) or `.pth` (needs torch)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(dict(state_dict), path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
