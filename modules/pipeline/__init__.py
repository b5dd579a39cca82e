"""Pipeline-parallel schedules: a simulator (1F1B, ZB1P, DualPipe), their timelines, and real pipelines."""
