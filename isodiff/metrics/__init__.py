"""The paper's evaluation metrics, one module each (reference/metrics.md).

Each module holds the metric's pure maths (arrays in, numbers out), its config (one
section of conf/eval/<preset>.yaml) and `evaluate(ctx, cfg) -> MetricResult`, which draws
what the maths needs from a trained model through `isodiff.metrics.common.EvalContext`.
"""
