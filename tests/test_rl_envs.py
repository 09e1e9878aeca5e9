"""RL task families: nav2d dynamics, termination and horizon; seeded task sampling; bad input;
half-cheetah rewards when gymnasium and mujoco are installed."""

import numpy as np
import pytest
import torch

from workers.rl.algorithms import sample_adaptation
from workers.rl.envs import Nav2D, Nav2DFamily, build_env_family, sample_tasks
from workers.rl.policy import GaussianMLPPolicy
from workers.spec import JobSpec


def test_nav2d_clips_the_velocity_and_rewards_minus_the_squared_distance() -> None:
    env = Nav2D(np.array([[0.5, -0.5], [0.5, -0.5]]), horizon=100)
    assert np.array_equal(env.reset(), np.zeros((2, 2)))
    obs, reward, done = env.step(np.array([[3.0, -0.05], [0.02, 0.0]]))
    assert np.allclose(obs, [[0.1, -0.05], [0.02, 0.0]])  # clipped to [-0.1, 0.1]^2
    assert np.allclose(reward, [-(0.4 ** 2 + 0.45 ** 2), -(0.48 ** 2 + 0.5 ** 2)])
    assert not done.any()
    distance = Nav2D(np.array([[0.5, -0.5]]), reward="distance")
    distance.reset()
    assert np.allclose(distance.step(np.array([[0.1, -0.05]]))[1], [-np.hypot(0.4, 0.45)])


def test_nav2d_ends_within_0_01_of_the_goal_and_at_the_horizon() -> None:
    env = Nav2D(np.array([[0.1, 0.0], [0.3, 0.0], [-0.4, 0.4]]), horizon=5)
    env.reset()
    _, _, done = env.step(np.array([[0.095, 0.0], [0.1, 0.0], [0.0, 0.0]]))
    assert done.tolist() == [True, False, False]  # 0.005 from the goal
    # A finished episode stays put and earns nothing.
    obs, reward, done = env.step(np.array([[0.1, 0.1], [0.1, 0.0], [0.0, 0.0]]))
    assert np.allclose(obs[0], [0.095, 0.0]) and reward[0] == 0.0 and done[0]
    _, _, done = env.step(np.array([[0.0, 0.0], [0.095, 0.0], [0.0, 0.0]]))
    assert done.tolist() == [True, True, False]  # 0.295 vs 0.3: 0.005 away
    env.step(np.zeros((3, 2)))
    _, _, done = env.step(np.zeros((3, 2)))
    assert done.tolist() == [True, True, True]  # the horizon (5 steps)


def test_task_sampling_is_a_pure_function_of_its_coordinates() -> None:
    family = Nav2DFamily()
    a, _ = sample_tasks(family, 7, "train", 3, range(20))
    b, _ = sample_tasks(family, 7, "train", 3, range(20))
    shard, _ = sample_tasks(family, 7, "train", 3, range(1, 20, 2))
    assert np.array_equal(a, b) and np.array_equal(a[1::2], shard)
    assert a.shape == (20, 2) and np.all(a >= -0.5) and np.all(a <= 0.5)
    assert not np.array_equal(a, sample_tasks(family, 7, "train", 4, range(20))[0])
    assert not np.array_equal(a, sample_tasks(family, 7, "test", 3, range(20))[0])
    assert not np.array_equal(a, sample_tasks(family, 8, "train", 3, range(20))[0])


def test_rollouts_are_deterministic_and_independent_of_sharding() -> None:
    family = Nav2DFamily()
    policy = GaussianMLPPolicy(2, 2, hidden=(16,))
    params = {n: p.detach() for n, p in policy.named_parameters()}

    def run(indices):
        tasks, rngs = sample_tasks(family, 0, "train", 0, indices)
        return sample_adaptation(policy, params, family, tasks, rngs, rollouts=3, steps=1, lr=0.1, horizon=20,
                                 indices=list(indices))

    whole, again, odd = run(range(4)), run(range(4)), run(range(1, 4, 2))
    for x, y in zip(whole, again, strict=True):
        assert torch.equal(x.post.actions, y.post.actions) and x.returns == y.returns
    for x, y in zip(whole[1::2], odd, strict=True):
        assert x.index == y.index
        assert torch.allclose(x.pre[0].obs, y.pre[0].obs) and torch.allclose(x.post.obs, y.post.obs, atol=1e-6)


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"task\.family: unknown environment 'ant'"):
        build_env_family("ant")
    family = Nav2DFamily()
    with pytest.raises(ValueError, match=r"task\.goal: \[0\.7, 0\.0\] is outside"):
        family.validate_task([0.7, 0.0])
    with pytest.raises(ValueError, match=r"task\.goal"):
        family.validate_task([0.1])
    assert np.array_equal(family.validate_task((0.2, -0.3)), [0.2, -0.3])
    from pydantic import ValidationError

    for field, value in [("horizon", 5000), ("rollouts", 10_000), ("family", "ant")]:
        with pytest.raises(ValidationError, match=field):
            JobSpec.model_validate({"task": {"family": "nav2d", field: value}})
    spec = JobSpec.model_validate({"task": {"family": "nav2d"}})
    assert spec.task.episode_length == 100 and spec.outer.meta_batch_size == 20


def test_halfcheetah_rewards() -> None:
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    vel = build_env_family("halfcheetah_vel")
    assert JobSpec.model_validate({"task": {"family": "halfcheetah_vel"}}).task.episode_length == 200
    assert JobSpec.model_validate({"task": {"family": "halfcheetah_dir"}}).outer.meta_batch_size == 40
    env = vel.make_env(np.array([[0.0], [2.0]]), np.array([1, 1]), horizon=3)
    obs = env.reset()
    assert obs.shape == (2, 17) and np.array_equal(obs[0], obs[1])  # same reset seed, same state
    actions = np.full((2, 6), 0.5)
    _, reward, done = env.step(actions)
    # Same state and action, so the same velocity v: -|v - 0| - ctrl vs -|v - 2| - ctrl.
    ctrl = 0.05 * 6 * 0.25
    v = -(reward[0] + ctrl)
    assert np.isclose(reward[1], -abs(abs(v) - 2) - ctrl) and not done.any()
    env.step(actions)
    assert env.step(actions)[2].all()  # the horizon
    direc = build_env_family("halfcheetah_dir")
    env = direc.make_env(np.array([[1.0], [-1.0]]), np.array([2, 2]), horizon=200)
    env.reset()
    _, reward, _ = env.step(np.full((2, 6), 2.0))  # clipped to 1
    assert np.isclose(reward[0] + reward[1], -2 * 0.05 * 6)
    with pytest.raises(ValueError, match=r"task\.velocity"):
        vel.validate_task(3.0)
    with pytest.raises(ValueError, match=r"task\.direction"):
        direc.validate_task(0.5)
    tasks, _ = sample_tasks(direc, 0, "train", 0, range(50))
    assert set(np.unique(tasks)) == {-1.0, 1.0}
