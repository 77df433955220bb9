"""What pretraining bought: pretrained vs randomly initialised encoder (SPEC 6).

After `configs/demo.py` pretrains, this evaluates the pretrained encoder and the
same encoder as pretraining initialised it, on each label named in
`config.eval.labels` of the synthetic data set (its static and its dynamic
label), by the fast linear probe and by retrieval, and prints one table.
"""

import os

from absl import logging
import jax

from cvc_jax import models
from cvc_jax import pretrain
from cvc_jax.downstream import evaluate
from cvc_jax.downstream import metrics


def initial_encoder(config) -> dict:
  """{'params', 'batch_stats'} of the encoder as `pretrain.train_and_evaluate`
  initialises it: bitwise, the same seed, key split and compiled initialisers.

  The demo's baseline is that very initialisation, so its table shows what
  pretraining changed and not the luck of another draw (a different random draw
  moved the dynamic probe by 11 points).
  """
  # Compiled as pretraining's is: run op by op, 20 of the demo's convolution
  # kernels came out 1 ulp apart.
  initial = models.jit_init(lambda rng: pretrain.initial_variables(
      config, rng, pretrain.views_shape_of(config, batch=1)))(jax.random.key(config.seed))
  return {c: initial[c]["backbone"] for c in ("params", "batch_stats")}


def compare(config, workdir: str) -> str:
  """Evaluates the pretrained encoder of `workdir` against a random one.

  Returns:
    The Markdown table, also written to `workdir/demo_results.md` with the
    numbers in `workdir/results.json`.
  """
  from cvc_jax import datasets  # pylint: disable=g-import-not-at-top
  builder = datasets.ensure_built(config)
  results, rows = {}, []
  with config.unlocked():
    config.init_from = workdir
  module, pretrained, described = evaluate.load_encoder(config)
  initial = initial_encoder(config)
  for name, variables in (("pretrained", pretrained), ("random init", initial)):
    logging.info("Evaluating %s (%s).", name,
                 described if name == "pretrained" else "its initialisation")
    labels = tuple(config.eval.labels)
    train_f, train_l = evaluate.features(config, module, variables,
                                         split=config.eval.train_split, label_keys=labels)
    test_f, test_l = evaluate.features(config, module, variables,
                                       split=config.eval.test_split, label_keys=labels)
    for label in labels:
      feature = builder.info.features[label]
      probe = evaluate.linear_probe_on_features(
          config, train_f, train_l[label], test_f, test_l[label],
          num_classes=feature.num_classes, class_names=feature.names)
      recall = metrics.retrieval_recall(test_f, test_l[label], train_f, train_l[label],
                                        ks=config.eval.recall_ks)
      results[f"{name}/{label}"] = dict(linear_top1=probe["top1"], **recall)
      rows.append(f"| {name} | {label} | {100 * probe['top1']:.1f} | "
                  f"{100 * recall['R@1']:.1f} | {100 * recall['R@5']:.1f} |")
  table = "\n".join(["| encoder | label | linear probe top-1 | R@1 | R@5 |",
                     "| --- | --- | --- | --- | --- |", *rows])
  if jax.process_index() == 0:  # every process has the results; one writes them
    evaluate.write_results(workdir, results, "Demo: pretrained vs random encoder")
    with open(os.path.join(workdir, "demo_results.md"), "w") as f:
      f.write(table + "\n")
    print(table)
  return table
