"""Pipeline parallelism: a simulator of pipeline-parallel schedules (1F1B, ZB1P, DualPipe; `schedules`), pictures and
tables of their timelines (`timeline`), and real pipelines: the decoder split into stages, run under
`torch.distributed.pipelining` and timed against the simulator (`real`)."""
