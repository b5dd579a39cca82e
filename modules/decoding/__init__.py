"""Decoding algorithms over the one decoder, all on one decode engine (`engine.py`: a static cache, and each
pass after the prefill one program, captured as a CUDA graph on CUDA): incremental generation (greedy,
top-k, top-p), speculative decoding by Leviathan et al.'s rejection rule with a decoder's own MTP heads, a
separate draft model or an EAGLE head as drafter, and Hogwild! inference (several workers over one shared
cache). Nothing here trains; the modules that train a drafter live in `modules.training`."""
