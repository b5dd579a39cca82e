"""The pipeline's invariants: a stage's prerequisites get the overrides the pipeline gave them."""

from __future__ import annotations

from repro.techniques.pipeline import PipelineSettings, stage_overrides


def test_prerequisites_get_the_pipelines_own_overrides() -> None:
    """A stage's prerequisites get the overrides the pipeline gave those techniques, prefixed down the chain
    (DPO requires reward requires pretrain), so the stage a technique requires is the run the pipeline ran."""
    settings = PipelineSettings(stages=["pretrain", "reward", "dpo"], overrides={"pretrain": ["a=1"], "reward": ["b=2"], "dpo": ["c=3"]},
                                serve={"stage": "dpo"})
    assert stage_overrides("pretrain", settings) == ["a=1"]
    assert stage_overrides("dpo", settings) == ["c=3", "reward.b=2", "reward.pretrain.a=1"]
