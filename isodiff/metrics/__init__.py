"""The paper's evaluation metrics, one module each (reference/metrics.md).

Each module holds the metric's pure maths (arrays in, numbers out), its config (one
section of conf/eval/<preset>.yaml) and `evaluate(ctx, cfg) -> MetricResult`, which draws
what the maths needs from a trained model through `isodiff.metrics.common.EvalContext`.
"""

# Values where more is better; every other value (FID, PPL, RTL, MCN, VoR, LS as a
# conditional entropy, errors, LPIPS, MSE) is better lower. A spec's `lower_is_better`
# overrides this per value (e.g. the R^2 of an edit, lin_*_r2).
HIGHER_IS_BETTER = ("psnr", "confident_", "classes_", "dci_", "mig_", "probe_",
                    # the diversity beside PPL (not ppl_<variant>_per_diversity: lower)
                    "ppl_stylegan_diversity", "ppl_isodiff_compat_diversity")


def lower_is_better(value: str) -> bool:
    """Whether a smaller number of this metric value is the better one."""
    return not value.startswith(HIGHER_IS_BETTER)
