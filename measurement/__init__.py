"""The measuring library: what techniques and benchmarks both measure, below both.

- `measurement.hardware`: the device's measured matmul rate (MFU's denominator) and peak memory;
- `measurement.memory`: ZeRO's bytes per parameter, the memory sweep's cases, table and plot;
- `measurement.hybrid`: decoding cache bytes and decode tokens/s against context length;
- `measurement.speculative`: MTP self-speculative decoding against plain decoding;
- `measurement.inference`: quantization schemes and speculative decoding of an inference run's target;
- `measurement.dualpipe`: real pipelines' step times beside the simulator's;
- `measurement.tokenizers`: the suite's subword tokenizers against the libraries they reproduce.

A technique calls these at the end of its run; `benchmarks/` holds the command lines that measure a trained run
again (on another machine) and the pytest-benchmark suites. Nothing here imports a technique, the runner or a
benchmark (notes/layers.md).
"""
