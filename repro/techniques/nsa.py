"""`--technique nsa`: native sparse attention against full attention of the same shape (Yuan et al. 2025).

The architectures machinery (`architectures.py`: arms side by side on the same batches, the needle-retrieval
task, the same steps and report) with the `nsa` preset's arms: NSA's compressed, selected and sliding-window
branches against full attention with the same query and KV heads. The claim checked from the run: NSA trains
to a lower loss; its speed at long context is `python -m benchmarks.nsa`'s, on a GPU.
"""

from __future__ import annotations

from typing import Any, Mapping

from reports.claims import ClaimResult, check_below, not_measured
from repro.registry import Technique, register
from repro.techniques.architectures import ARCHITECTURES, ArchitecturesConfig, arm_configs

SOURCE = "Native Sparse Attention (Yuan et al. 2025)"


def claims(config: ArchitecturesConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """NSA against the full-attention arm of the same shape."""
    configs = arm_configs(config)
    nsa = next((k for k, c in configs.items() if c.attention == "nsa"), None)
    full = next((k for k, c in configs.items() if nsa and c.attention == "standard" and c.kv_heads == configs[nsa].kv_heads), None)
    speed = not_measured("NSA's attention is faster than full attention at long context", SOURCE,
                         "attention ms against context length", "9.0x forward, 6.0x backward at 64k (Fig. 6)",
                         "kernel timing is `python -m benchmarks.nsa` on a GPU (reports/nsa/README.md)")
    if full is None:
        why = f"needs a standard arm with {configs[nsa].kv_heads} KV heads" if nsa else "needs an arm with model.attention=nsa"
        return [not_measured("NSA trains to a loss no worse than full attention", SOURCE, "validation loss",
                             "lower pretraining loss than full attention (Fig. 4)", why), speed]
    return [check_below(
        claim="NSA trains to a lower loss than full attention", source=SOURCE,
        metric=f"validation loss of {nsa} against {full}", measured=metrics.get(f"{nsa}/val_loss"),
        bound=metrics.get(f"{full}/val_loss"), factor=1.0, paper="lower pretraining loss than full attention (Fig. 4, 27B model)",
        bound_name=f"{full}'s loss"), speed]


register(Technique(name="nsa", summary="native sparse attention (compressed, selected, sliding-window branches) against full attention",
                   aliases=("native-sparse-attention",), claims=claims, **ARCHITECTURES))
