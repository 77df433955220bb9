"""Walking a jaxpr in tests: what a traced function actually computes."""

from collections.abc import Iterator

import jax.extend


def equations(jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
  """Every equation of `jaxpr` (a Jaxpr or ClosedJaxpr), those of its sub-jaxprs
  (jit, custom_vjp, remat, scan bodies, ...) included, outermost first."""
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)
