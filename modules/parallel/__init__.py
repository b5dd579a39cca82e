"""Parallelism, applied to the one decoder from outside it: `plan` holds a run's parallel plan (activation
checkpointing per block, FSDP2 sharding of every block and decoder) and `TechniqueModule`, the LightningModule base
that applies it once the strategy is set up; `pipeline` holds pipeline parallelism, a simulator of its schedules
(GPipe, 1F1B, ZB1P, DualPipe) with their timelines, and the decoder split into stages and run under
`torch.distributed.pipelining`."""
