"""The LightningModules, one per technique (pretraining, SFT with LoRA, the reward model, PPO, DPO and its relatives,
MTP, mixtures of experts, hybrids, architecture knobs, corpus ablations, drafters for speculative decoding), each a
system holding decoders of `modules.nn` on `modules.parallel.plan.TechniqueModule`; `arms` trains several of them side
by side on the same batches, and `pretrain` holds the AdamW settings and schedule every module shares. The needle
task (`needle`), a synthetic retrieval task with the plain training loop that scores an architecture on it, lives
here too."""
