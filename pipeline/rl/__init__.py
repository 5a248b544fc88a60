"""The RL stage's pieces, apart from the stage plumbing (config, artifacts, plans, launch) in pipeline/:

    rollout.py        sampling responses exactly as the log-probs assume
    rewards.py        reward sources (reward models, Python functions, reward servers) and judges
    reward_server.py  `make serve-rm`: a reward model behind HTTP
    estimators.py     critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++) and loss aggregation
    ppo_math.py       PPO's math: KL estimates, token rewards, GAE, clipped losses, the KL controller
    ppo.py            one iteration's phases on models: score, advantages, update, metrics
    run.py            the run around them: models, schedule, checkpoints, logging, the artifact
"""
