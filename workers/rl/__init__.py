"""Meta-reinforcement learning: MAML with a policy-gradient inner loop and a TRPO meta-update.

>>> from workers.rl import RLConfig, run_rl_training
>>> result = run_rl_training(RLConfig(iterations=100), run_dir=run_dir, reporter=report,
...                          should_stop=lambda: False, use_ray=False)
"""

from workers.rl.adapt import AdaptResult, adapt_exported, adapt_policy, load_policy
from workers.rl.config import RLConfig
from workers.rl.envs import build_env_family
from workers.rl.trainer import RLTrainer, RolloutWorker, evaluate_adaptation, run_rl_training

__all__ = ["AdaptResult", "RLConfig", "RLTrainer", "RolloutWorker", "adapt_exported", "adapt_policy",
           "build_env_family", "evaluate_adaptation", "load_policy", "run_rl_training"]
