"""`--technique diff-attn`: differential attention against softmax attention of equal size (Ye et al., ICLR 2025).

The architectures machinery (`architectures.py`: arms side by side on the same batches, the needle-retrieval
task of `modules/training/needle.py`, the same steps and report) with the `diff-attn` preset's arms: a DIFF arm of n
heads against a softmax arm of 2n heads at half the width, so both have the same size. The claims: DIFF
reaches a lower loss, and retrieves the needle (a key-value lookup in long context) better.
"""

from __future__ import annotations

from typing import Any, Mapping

from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro.registry import Technique, register
from repro.techniques.architectures import ARCHITECTURES, ArchitecturesConfig, arm_configs

SOURCE = "Differential Transformer (Ye et al., ICLR 2025)"
RETRIEVAL = "Differential attention cancels attention noise: better key retrieval in long context"
NEEDLE_PAPER = "multi-needle retrieval 0.85-0.9 vs 0.55-0.6 at 4k (Table 2)"
LOSS = "DIFF reaches a lower loss than softmax attention of equal size"
LOSS_PAPER = "matches a 1.5x larger transformer"


def claims(config: ArchitecturesConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """Differential attention against the softmax arm of twice its heads at half the width (equal size)."""
    configs = arm_configs(config)
    diff = next((n for n, c in configs.items() if c.attention == "diff"), None)
    if diff is None:
        why = "needs an arm with model.attention=diff"
        return [not_measured(LOSS, SOURCE, "validation loss", LOSS_PAPER, why),
                not_measured(RETRIEVAL, SOURCE, "needle (key-value lookup) accuracy", NEEDLE_PAPER, why)]
    d = configs[diff]
    twin = next((n for n, c in configs.items() if c.attention == "standard" and c.n_head == 2 * d.n_head), None)
    if twin is not None and config.needle.enabled:
        retrieval = check_above(
            claim=RETRIEVAL, source=SOURCE, metric=f"needle lookup accuracy of {diff} against {twin}",
            measured=metrics.get(f"{diff}/needle_accuracy"), bound=metrics.get(f"{twin}/needle_accuracy"), factor=1.0,
            paper=NEEDLE_PAPER, bound_name=f"{twin}'s accuracy")
    else:
        retrieval = not_measured(RETRIEVAL, SOURCE, "needle (key-value lookup) accuracy", NEEDLE_PAPER,
                                 "set needle.enabled=true (and a softmax arm of twice the heads)")
    if twin is None:
        return [retrieval, not_measured(LOSS, SOURCE, "validation loss", LOSS_PAPER, f"needs a softmax arm with {2 * d.n_head} heads")]
    return [check_below(
        claim=LOSS, source=SOURCE,
        metric=f"validation loss of {diff} ({d.n_head} heads of {d.head_dim}) against {twin} ({2 * d.n_head} heads of "
        f"{d.head_dim // 2})", measured=metrics.get(f"{diff}/val_loss"), bound=metrics.get(f"{twin}/val_loss"), factor=1.0,
        paper="about 65% of the size or tokens for the same loss (Fig. 3, 4)", bound_name=f"{twin}'s loss"), retrieval]


register(Technique(name="diff-attn", summary="differential attention against softmax attention of equal size, and needle retrieval",
                   aliases=("differential-attention",), claims=claims, **ARCHITECTURES))
