"""RL task families: environments vectorised over a batch of tasks, seeded and reproducible.

A *task* is a small parameter vector (a goal, a target velocity, a direction). A family draws
tasks as a pure function of (seed, split, iteration, index) through ``task_rng`` (the supervised
families' generator), so a meta-batch splits over any number of rollout workers and a resumed run
sees the tasks it would have seen. ``make_env(tasks, seeds, horizon)`` builds one vectorised
environment holding one sub-environment per row of ``tasks`` (E rows: tasks x rollouts).

Families (Finn, Abbeel and Levine, 2017, section 5.3):

- ``nav2d``: a point in the plane; observation = position (2,), action = velocity clipped to
  [-0.1, 0.1]^2, start at the origin, goal uniform in [-0.5, 0.5]^2; the episode ends within 0.01
  of the goal or at the horizon (100). Reward: minus the *squared* distance to the goal, as the
  issue and the paper's text say. The authors' rllab code (``point_env_randgoal.py``) uses minus
  the Euclidean distance; ``reward="distance"`` gives that variant.
- ``halfcheetah_vel`` / ``halfcheetah_dir``: gymnasium's MuJoCo ``HalfCheetah-v5`` with the MAML
  rewards (rllab's ``half_cheetah_env_rand*.py``): -|v - v_goal| - 0.05 |a|^2 with v_goal uniform in
  [0, 2], or d * v - 0.05 |a|^2 with d = +1 or -1; horizon 200. gymnasium and mujoco are imported
  only when one of these is built.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from workers.errors import SpecError
from workers.tasks.base import Split, task_rng

FamilyName = Literal["nav2d", "halfcheetah_vel", "halfcheetah_dir"]
FAMILIES: tuple[str, ...] = ("nav2d", "halfcheetah_vel", "halfcheetah_dir")


class VecEnv(Protocol):
    """E sub-environments stepped together. Arrays are float64 numpy, one row per sub-environment."""

    num_envs: int
    obs_dim: int
    act_dim: int

    def reset(self) -> np.ndarray: ...  # (E, obs_dim)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(E, act_dim) -> observations (E, obs_dim), rewards (E,), dones (E,) bool."""
        ...


class EnvFamily(Protocol):
    name: str
    obs_dim: int
    act_dim: int
    task_dim: int

    def sample_task(self, rng: np.random.Generator) -> np.ndarray: ...  # (task_dim,)

    def validate_task(self, task: object) -> np.ndarray: ...  # SpecError naming the task field if invalid

    def make_env(self, tasks: np.ndarray, seeds: np.ndarray, horizon: int) -> VecEnv: ...


def sample_tasks(family: EnvFamily, seed: int, split: Split, iteration: int,
                 indices: range | list[int]) -> tuple[np.ndarray, list[np.random.Generator]]:
    """The tasks (len(indices), task_dim) at these coordinates, and each task's generator
    (already advanced past the task draw) for its rollout noise and reset seeds."""
    rngs = [task_rng(seed, split, iteration, i) for i in indices]
    tasks = np.stack([family.sample_task(r) for r in rngs]) if rngs else np.zeros((0, family.task_dim))
    return tasks, rngs


# ----------------------------------------------------------------------------------------------
# 2D navigation


class Nav2D:
    """Point navigation to one goal per sub-environment.

    ``Nav2D(goals (E, 2))``: positions start at the origin; ``step`` clips the velocity to
    [-max_speed, max_speed]^2, moves, and rewards the new position. A sub-environment that is done
    stays where it is and returns reward 0 (the sampler masks those steps anyway).
    """

    obs_dim = 2
    act_dim = 2

    def __init__(self, goals: np.ndarray, *, horizon: int = 100, reward: str = "squared",
                 max_speed: float = 0.1, goal_tolerance: float = 0.01) -> None:
        goals = np.asarray(goals, dtype=np.float64)
        if goals.ndim != 2 or goals.shape[1] != 2:
            raise SpecError("task", f"goals must have shape (E, 2), got {goals.shape}")
        if reward not in ("squared", "distance"):
            raise SpecError("reward", f"unknown nav2d reward '{reward}' (expected 'squared' or 'distance')")
        self.goals, self.horizon, self.reward = goals, horizon, reward
        self.max_speed, self.goal_tolerance = max_speed, goal_tolerance
        self.num_envs = len(goals)
        self.reset()

    def reset(self) -> np.ndarray:
        self.pos = np.zeros((self.num_envs, 2))
        self.t = 0
        self.done = np.zeros(self.num_envs, dtype=bool)
        return self.pos.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        live = ~self.done
        velocity = np.clip(np.asarray(actions, dtype=np.float64), -self.max_speed, self.max_speed)
        self.pos[live] += velocity[live]
        dist = np.linalg.norm(self.pos - self.goals, axis=1)  # (E,)
        reward = -(dist ** 2) if self.reward == "squared" else -dist
        reward = np.where(live, reward, 0.0)
        self.t += 1
        self.done = self.done | (dist < self.goal_tolerance) | (self.t >= self.horizon)
        return self.pos.copy(), reward, self.done.copy()


class Nav2DFamily:
    """Goals uniform in [low, high]^2 (the paper: [-0.5, 0.5]^2)."""

    name = "nav2d"
    obs_dim = 2
    act_dim = 2
    task_dim = 2

    def __init__(self, *, reward: str = "squared", low: float = -0.5, high: float = 0.5) -> None:
        self.reward, self.low, self.high = reward, low, high

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.low, self.high, size=2)

    def validate_task(self, task: object) -> np.ndarray:
        goal = np.asarray(task, dtype=np.float64).reshape(-1)
        if goal.shape != (2,) or not np.all(np.isfinite(goal)):
            raise SpecError("task.goal", f"expected two finite numbers (x, y), got {task!r}")
        if np.any(goal < self.low) or np.any(goal > self.high):
            raise SpecError("task.goal", f"{goal.tolist()} is outside [{self.low}, {self.high}]^2")
        return goal

    def make_env(self, tasks: np.ndarray, seeds: np.ndarray, horizon: int) -> Nav2D:
        return Nav2D(tasks, horizon=horizon, reward=self.reward)  # deterministic: no reset noise


# ----------------------------------------------------------------------------------------------
# Half-cheetah on MuJoCo


class HalfCheetahVec:
    """E gymnasium HalfCheetah-v5 environments (from the family's pool) with MAML rewards."""

    act_dim = 6
    obs_dim = 17

    def __init__(self, envs: list, tasks: np.ndarray, seeds: np.ndarray, *, mode: str, horizon: int,
                 ctrl_cost: float = 0.05) -> None:
        self.envs, self.tasks, self.seeds = envs, np.asarray(tasks, dtype=np.float64)[:, 0], seeds
        self.mode, self.horizon, self.ctrl_cost = mode, horizon, ctrl_cost
        self.num_envs = len(envs)

    def reset(self) -> np.ndarray:
        self.t = 0
        return np.stack([env.reset(seed=int(s))[0] for env, s in zip(self.envs, self.seeds, strict=True)])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        obs = np.empty((self.num_envs, self.obs_dim))
        velocity = np.empty(self.num_envs)
        for i, env in enumerate(self.envs):
            obs[i], _, _, _, info = env.step(actions[i])
            velocity[i] = info["x_velocity"]
        ctrl = self.ctrl_cost * np.sum(actions ** 2, axis=1)
        if self.mode == "vel":
            reward = -np.abs(velocity - self.tasks) - ctrl
        else:
            reward = self.tasks * velocity - ctrl
        self.t += 1
        return obs, reward, np.full(self.num_envs, self.t >= self.horizon)


class HalfCheetahFamily:
    """``halfcheetah_vel``: target velocity uniform in [0, 2]; ``halfcheetah_dir``: +1 or -1.

    Keeps a pool of gymnasium environments and lends its first E to each ``make_env``: building a
    MuJoCo environment costs milliseconds, stepping it microseconds. One vectorised environment
    is in use at a time (the sampler's phases run one after the other).
    """

    obs_dim = 17
    act_dim = 6
    task_dim = 1

    def __init__(self, mode: str) -> None:
        if mode not in ("vel", "dir"):
            raise SpecError("task.family", f"unknown half-cheetah mode '{mode}'")
        try:
            import gymnasium  # noqa: F401
            import mujoco  # noqa: F401
        except ImportError as exc:
            raise SpecError("task.family", f"halfcheetah_{mode} needs the gymnasium and mujoco packages "
                             f"(pip install 'gymnasium[mujoco]'): {exc}") from exc
        self.mode = mode
        self.name = f"halfcheetah_{mode}"
        self._pool: list = []

    def sample_task(self, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "vel":
            return rng.uniform(0.0, 2.0, size=1)
        return np.array([1.0 if rng.random() < 0.5 else -1.0])

    def validate_task(self, task: object) -> np.ndarray:
        value = np.asarray(task, dtype=np.float64).reshape(-1)
        if value.shape != (1,) or not np.isfinite(value[0]):
            raise SpecError(f"task.{'velocity' if self.mode == 'vel' else 'direction'}",
                            f"expected one number, got {task!r}")
        if self.mode == "vel" and not 0.0 <= value[0] <= 2.0:
            raise SpecError("task.velocity", f"{value[0]} is outside [0, 2]")
        if self.mode == "dir" and value[0] not in (-1.0, 1.0):
            raise SpecError("task.direction", f"{value[0]} is not +1 or -1")
        return value

    def make_env(self, tasks: np.ndarray, seeds: np.ndarray, horizon: int) -> HalfCheetahVec:
        import gymnasium as gym

        while len(self._pool) < len(tasks):
            # .unwrapped: our own time limit and rewards; gymnasium's wrappers only add overhead here.
            self._pool.append(gym.make("HalfCheetah-v5").unwrapped)
        return HalfCheetahVec(self._pool[:len(tasks)], tasks, seeds, mode=self.mode, horizon=horizon)


def build_env_family(name: str, *, reward: str = "squared") -> EnvFamily:
    """The family called ``name``; SpecError naming ``task.family`` for an unknown one."""
    if name == "nav2d":
        return Nav2DFamily(reward=reward)
    if name == "halfcheetah_vel":
        return HalfCheetahFamily("vel")
    if name == "halfcheetah_dir":
        return HalfCheetahFamily("dir")
    raise SpecError("task.family", f"unknown environment '{name}' (expected one of {', '.join(FAMILIES)})")
