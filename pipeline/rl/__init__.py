"""The RL stage's pieces, apart from the stage plumbing (recipe, artifacts, plans, launch) in pipeline/:

algorithms.py     the math: log-probs, KL, token rewards, GAE, the critic-free estimators, the losses
rollout.py        sampling responses exactly as the log-probs assume
agent.py, tools.py  multi-turn rollouts: the policy calls tools and reads their results
rewards.py        reward sources (reward models, Python functions, reward servers) and judges
reward_server.py  `make serve-rm`: a reward model behind HTTP
iteration.py      one iteration's phases on models: reward, score, advantages, update, metrics
run_setup.py      what the run starts with: models, schedule, optimiser
run_state.py      the run across iterations: checkpoints and resume, logs, the best policy, the artifact
"""
