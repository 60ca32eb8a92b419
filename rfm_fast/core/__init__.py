"""The kernel core: the mathematics of rfm_fast, written once (docs/maths.md).

    kernels    KernelSpec: constants, value and gradient-weight formulas, near thresholds per dtype
    metric     MetricFactor: M = F F^T at the rank float precision can see; psd_sqrt
    geometry   Geometry: centring, scaled coordinates, direct/expansion split, near bounds, exact pairs
    plan       the one tile planner (BudgetError when nothing fits)
    tiles      distance fill, near test, elementwise pass (pluggable), exact near pairs
    matvec     kernel mat-vec and kernel matrix schedules (one-sided, symmetric)
    gradient   raw gradient schedules (one-sided, symmetric), with direct coordinates and the near field
    agop       the AGOP accumulation (shifted centring, scaled Grams) and finish
    autograd   differentiable kernel_matrix / kernel_mv
    ops        the four ops for backends that work on tiles

Backends (``rfm_fast.backends``) supply primitives to these modules and re-derive none of their rules.
"""
