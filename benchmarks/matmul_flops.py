"""Matmul FLOPs of a traced JAX program, counted from its jaxpr. One counter for benchmarks/throughput.py (our
chunks) and benchmarks/jaxcorl.py, whose launcher imports it inside JAX-CORL's own venv: so it needs jax and numpy
only, nothing else of ours."""

import numpy as np
from jax.extend import core as jax_core


def count_matmul_flops(jaxpr) -> int:
    """2 x output elements x contracted length, summed over every dot_general, through nested jaxprs (jit, scan with
    its length, custom derivatives, conditionals count their most expensive branch)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs_shape[d] for d in lhs_contract])) if lhs_contract else 1
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
            continue
        subs = []
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, jax_core.ClosedJaxpr):
                    subs.append(item.jaxpr)
                elif isinstance(item, jax_core.Jaxpr):
                    subs.append(item)
        if not subs:
            continue
        counts = [count_matmul_flops(sub) for sub in subs]
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        total += times * (max(counts) if eqn.primitive.name == "cond" else sum(counts))
    return total
