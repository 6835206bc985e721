"""Post-training: chat SFT with reasoning control, RL with verifiable rewards (environments, a code
sandbox, policy-gradient losses), and later multi-teacher distillation. Rollouts and log-probs come
from the one batched decoder (:mod:`kinetic.infer.decoder`) and the one scorer
(:mod:`kinetic.infer.scoring`); training runs on the one trainer (:mod:`kinetic.train`)."""
