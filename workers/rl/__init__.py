"""Meta-reinforcement learning: MAML with a policy-gradient inner loop and a TRPO meta-update.

An RL job is a ``JobSpec`` whose ``task.family`` is an RL one; ``workers.run.run_training`` trains
it with ``workers.rl.program.RLProgram``:

>>> spec = JobSpec.model_validate({"task": {"family": "nav2d"}, "outer": {"iterations": 100}})
>>> result = run_training(spec, run_dir=run_dir, reporter=report, should_stop=lambda: False, use_ray=False)
"""

from workers.rl.adapt import AdaptResult, adapt_exported, adapt_policy, load_policy
from workers.rl.envs import build_env_family
from workers.rl.program import RLProgram, RolloutWorker, build_family, build_policy, evaluate_adaptation

__all__ = ["AdaptResult", "RLProgram", "RolloutWorker", "adapt_exported", "adapt_policy", "build_env_family",
           "build_family", "build_policy", "evaluate_adaptation", "load_policy"]
