"""Tests of the patch-localization environment (envs/).

Geometry, dynamics and the optimal return are checked against implementations written here from the
task's definition (boxes in units of m/16), not against the env's own tables.
"""

import copy
import hashlib

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from envs import (
    DOWN,
    LEFT,
    NUM_ACTIONS,
    RIGHT,
    STOP,
    UP,
    ZOOM_IN,
    ZOOM_OUT,
    EpisodeConfig,
    PatchLocConfigError,
    PatchLocEnv,
    PatchLocVecEnv,
    draw_episode,
    draw_episode_steps,
    draw_episodes,
    episode_windows,
    make_task_sets,
    procedural_image,
    run_tasks,
)
from envs.lattice import NORMALIZED_BOXES, STATES, TRANSITIONS, optimal_returns, state_index

# Small views keep the tests fast; V = 16 makes one lattice unit (m/16) exactly one overview pixel
V = 16


@pytest.fixture(scope="module")
def sets():
    return make_task_sets(12, 4, image_size=4 * V, view_size=V, seed=3)


@pytest.fixture(scope="module")
def train(sets):
    return sets[0]


# --------------------------------------------------------------------------------------------------
# Independent reference geometry: a window is (y, x, side) in units of m/16 (image side = 16 units).
# --------------------------------------------------------------------------------------------------
def ref_move(y, x, side, action):
    """Reference dynamics, vectorised over windows (int arrays), from the task's definition."""
    y, x, side = (np.array(v, dtype=np.int64, copy=True) for v in (y, x, side))
    step = side // 4
    if action in (UP, DOWN, LEFT, RIGHT):
        coord = y if action in (UP, DOWN) else x
        moved = coord + (step if action in (DOWN, RIGHT) else -step)
        inside = (moved >= 0) & (moved + side <= 16)  # a step outside the image is a no-op
        coord[inside] = moved[inside]
    elif action == ZOOM_IN:
        can = side > 4  # smallest window: m/4
        y[can] += side[can] // 4  # same centre, half the side
        x[can] += side[can] // 4
        side[can] //= 2
    elif action == ZOOM_OUT:
        can = side < 16
        for coord in (y, x):
            # Among the lattice positions of the doubled window that fit in the image, the one whose
            # centre is closest to the old centre; ties go to the position nearer the image centre.
            new_side = np.where(can, 2 * side, side)
            best = coord.copy()
            best_key = np.full(coord.shape, np.inf)
            for k in range(13):
                cand = k * new_side // 4
                ok = can & (cand + new_side <= 16)
                key = np.abs(2 * cand + new_side - (2 * coord + side)) * 100 + np.abs(
                    2 * cand + new_side - 16
                )
                better = ok & (key < best_key)
                best[better], best_key[better] = cand[better], key[better]
            coord[can] = best[can]
        side[can] *= 2
    return y, x, side


def ref_iou(a, b):
    """IoU of boxes given as (..., 4) (y0, x0, y1, x1)."""
    ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ih * iw

    def area(c):
        return (c[..., 2] - c[..., 0]) * (c[..., 3] - c[..., 1])

    return inter / (area(a) + area(b) - inter)


def ref_all_windows():
    """Every lattice window (y, x, side) in units, enumerated from the definition."""
    wins = [
        (r * s // 4, c * s // 4, s)
        for s in (16, 8, 4)
        for r in range(4 * 16 // s - 3)
        for c in range(4 * 16 // s - 3)
    ]
    return tuple(np.array(v) for v in zip(*wins))


def box_of(y, x, side):
    return np.stack([y, x, y + side, x + side], axis=-1)


# --------------------------------------------------------------------------------------------------
# Observations and actions
# --------------------------------------------------------------------------------------------------
def test_observation_shape_dtype_and_content(train):
    env = PatchLocEnv(train)
    obs, info = env.reset(seed=0, options={"task_id": 2})
    assert (
        obs.shape == (3, V, V, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    )
    assert env.action_space == gym.spaces.Discrete(7) and NUM_ACTIONS == 7
    assert set(info) >= {"task_id", "iou", "optimal_return"} and info["task_id"] == 2
    np.testing.assert_array_equal(obs[0], train.target_patch(2))
    np.testing.assert_array_equal(obs[2], train.levels[0][2])  # the first window is the full image
    venv = PatchLocVecEnv(train, num_envs=3)
    vobs, _ = venv.reset(seed=0)
    assert (
        vobs.shape == (3, 3, V, V, 3)
        and vobs.dtype == np.uint8
        and venv.observation_space.contains(vobs)
    )
    assert venv.single_observation_space.shape == (3, V, V, 3) and venv.single_action_space.n == 7
    assert venv.action_space.shape == (3,)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP


def test_gymnasium_env_checker(train):
    from gymnasium.utils.env_checker import check_env

    check_env(PatchLocEnv(train), skip_render_check=True)


def test_action_table_matches_reference_geometry():
    """Every action from every one of the 195 windows, against the reference dynamics above."""
    boxes = np.round(NORMALIZED_BOXES * 16).astype(np.int64)
    y, x, side = boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    for action in range(NUM_ACTIONS):
        ny, nx, nside = ref_move(y, x, side, action)
        np.testing.assert_array_equal(
            boxes[TRANSITIONS[:, action]], box_of(ny, nx, nside), err_msg=f"action {action}"
        )


def test_actions_move_the_window(train):
    # Every target at (2, 7, 5): far from the windows visited below, so no success
    far = copy.copy(train)
    far.target_states = np.full(train.num_tasks, state_index(2, 7, 5))
    env = PatchLocEnv(far, max_steps=100)
    env.reset(seed=0, options={"task_id": 0})

    def act(action, expected):
        _, _, terminated, truncated, _ = env.step(action)
        assert env.window == expected, (action, env.window, expected)
        assert not truncated and terminated == (action == STOP)

    assert env.window == (0, 0, 0)
    for a in (UP, DOWN, LEFT, RIGHT, ZOOM_OUT):  # the full image cannot move or zoom out
        act(a, (0, 0, 0))
    act(ZOOM_IN, (1, 2, 2))
    # Same centre, half the side
    np.testing.assert_allclose(env.window_box, [0.25, 0.25, 0.75, 0.75])
    act(UP, (1, 1, 2))
    act(UP, (1, 0, 2))
    act(UP, (1, 0, 2))  # border: no-op
    act(LEFT, (1, 0, 1))
    act(LEFT, (1, 0, 0))
    act(LEFT, (1, 0, 0))
    act(ZOOM_IN, (2, 2, 2))
    # Centre (1/4, 1/4) kept
    np.testing.assert_allclose(env.window_box, [1 / 8, 1 / 8, 3 / 8, 3 / 8])
    act(ZOOM_IN, (2, 2, 2))  # zoom 2 is the deepest
    act(UP, (2, 1, 2))
    # Exact position would be (-1/2, 0): rounded and clamped inside the image
    act(ZOOM_OUT, (1, 0, 0))
    for _ in range(5):
        env.step(DOWN)
        env.step(RIGHT)
    assert env.window == (1, 4, 4)
    act(DOWN, (1, 4, 4))
    act(RIGHT, (1, 4, 4))
    act(ZOOM_IN, (2, 10, 10))
    for _ in range(3):
        env.step(DOWN)
        env.step(RIGHT)
    assert env.window == (2, 12, 12)
    act(ZOOM_OUT, (1, 4, 4))  # clamped to the bottom-right corner
    act(ZOOM_IN, (2, 10, 10))
    env.step(UP)
    # Centre (11, 12) units: rows 3 and 4 are equally close, ties go towards the image centre
    act(ZOOM_OUT, (1, 3, 4))
    act(ZOOM_OUT, (0, 0, 0))
    act(STOP, (0, 0, 0))


def test_zoom_keeps_centre_everywhere():
    boxes = NORMALIZED_BOXES
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    zoom = STATES[:, 0]
    inner = zoom < 2
    np.testing.assert_allclose(centre[TRANSITIONS[inner, ZOOM_IN]], centre[inner])
    outer = zoom > 0
    after = boxes[TRANSITIONS[outer, ZOOM_OUT]]
    assert (after >= 0).all() and (after <= 1).all()
    new_step = (after[:, 2] - after[:, 0]) / 4
    # Off the border the centre moves by at most half a lattice step of the new zoom.
    shift = np.abs(centre[TRANSITIONS[outer, ZOOM_OUT]] - centre[outer]).max(axis=1)
    free = (
        (boxes[outer, 0] > 0.25)
        & (boxes[outer, 2] < 0.75)
        & (boxes[outer, 1] > 0.25)
        & (boxes[outer, 3] < 0.75)
    )
    assert (shift[free] <= new_step[free] / 2 + 1e-12).all()


def test_overview_outline_and_view_follow_the_window(train):
    env = PatchLocEnv(train, max_steps=200)
    rng = np.random.default_rng(0)
    for task in range(3):
        obs, _ = env.reset(options={"task_id": task})
        for _ in range(40):
            box = env.window_box
            changed = np.flatnonzero((obs[1] != train.levels[0][task]).any(axis=-1).reshape(-1))
            rows, cols = changed // V, changed % V
            y0, x0, y1, x1 = np.round(box * V).astype(int)
            # The changed pixels are the 1-px rectangle around the window, in the outline colour.
            assert (rows.min(), cols.min(), rows.max(), cols.max()) == (y0, x0, y1 - 1, x1 - 1)
            border = np.zeros((V, V), dtype=bool)
            border[[y0, y1 - 1], x0:x1] = True
            border[y0:y1, [x0, x1 - 1]] = True
            assert (obs[1][border] == train.outline_colours[task]).all()
            assert (obs[1][~border] == train.levels[0][task][~border]).all()
            # The current view is the window's content: an area-downsampled crop of the full image.
            top = train.image(task).astype(np.float32)
            py0, px0, py1, px1 = np.round(box * 4 * V).astype(int)
            f = (py1 - py0) // V
            crop = top[py0:py1, px0:px1].reshape(V, f, V, f, 3).mean(axis=(1, 3))
            assert np.abs(obs[2].astype(np.float32) - crop).max() <= 1.0
            obs, _, terminated, _, _ = env.step(int(rng.integers(6)))  # no stop
            if terminated:
                break


def test_target_patch_is_the_target_window(train):
    for task in range(train.num_tasks):
        y0, x0, y1, x1 = np.round(train.target_boxes[task] * 4 * V).astype(int)
        f = (y1 - y0) // V
        assert f in (2, 1)  # targets have side m/2 (zoom 1) or m/4 (zoom 2)
        crop = (
            train.image(task)[y0:y1, x0:x1]
            .astype(np.float32)
            .reshape(V, f, V, f, 3)
            .mean(axis=(1, 3))
        )
        assert np.abs(train.target_patch(task).astype(np.float32) - crop).max() <= 1.0


# --------------------------------------------------------------------------------------------------
# Reward and optimal return
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"success_bonus": 0.5, "stop_penalty": 0.0, "max_steps": 7},
        {"success_iou": 0.9, "stop_penalty": -0.1},
    ],
)
def test_rewards_telescope(train, params):
    cfg = EpisodeConfig(**params)
    env = PatchLocEnv(train, **params)
    rng = np.random.default_rng(1)
    outcomes = set()
    for episode in range(60):
        _, info = env.reset(seed=episode)
        task = info["task_id"]
        start_iou = info["iou"]
        assert start_iou == ref_iou(train.target_boxes[task], np.array([0.0, 0.0, 1.0, 1.0]))
        total, done, length = 0.0, False, 0
        while not done:
            # Biased towards zooming in so that successes happen too.
            action = int(rng.choice(7, p=[0.12, 0.12, 0.12, 0.12, 0.3, 0.1, 0.12]))
            _, reward, terminated, truncated, info = env.step(action)
            total += reward
            length += 1
            done = terminated or truncated
            assert info["iou"] == pytest.approx(ref_iou(train.target_boxes[task], env.window_box))
        success, stopped = info["success"], info["stopped"]
        assert success == (info["iou"] >= cfg.success_iou) and not (success and stopped)
        assert truncated == (not success and not stopped) and (
            length == cfg.max_steps or not truncated
        )
        expected = (
            info["iou"] - start_iou + cfg.success_bonus * success - cfg.stop_penalty * stopped
        )
        assert total == pytest.approx(expected, abs=1e-9)
        assert total <= info["optimal_return"] + 1e-9
        outcomes.add("success" if success else "stop" if stopped else "truncated")
    assert len(outcomes) >= 2


def brute_force_optimal(config: EpisodeConfig):
    """Optimal return for each of the 195 possible targets by
    enumerating ALL 7^H action sequences."""
    horizon = config.max_steps
    y, x, side = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.full(1, 16)
    path_boxes, path_actions = [box_of(y, x, side)[:, None]], np.zeros((1, 0), dtype=np.int64)
    for _ in range(horizon):  # trajectories of every sequence, grown one action at a time
        grown = [ref_move(y, x, side, a) for a in range(7)]
        y, x, side = (np.concatenate([g[k] for g in grown]) for k in range(3))
        path_boxes = [np.concatenate([p] * 7) for p in path_boxes] + [box_of(y, x, side)[:, None]]
        path_actions = np.concatenate(
            [
                np.concatenate([path_actions, np.full((len(path_actions), 1), a)], 1)
                for a in range(7)
            ]
        )
    assert len(np.unique(path_actions, axis=0)) == 7**horizon  # every sequence, once
    boxes = np.concatenate(path_boxes, axis=1)  # (7^H, H+1, 4)
    best = {}
    for target in np.round(NORMALIZED_BOXES * 16).astype(np.int64):
        ious = ref_iou(boxes, target)  # (7^H, H+1)
        returns = np.full(len(boxes), np.nan)
        for t in range(1, horizon + 1):  # the episode ends at the first success or stop
            open_ = np.isnan(returns)
            succ = open_ & (ious[:, t] >= config.success_iou)
            returns[succ] = ious[succ, t] - ious[succ, 0] + config.success_bonus
            stop = open_ & ~succ & (path_actions[:, t - 1] == STOP)
            returns[stop] = ious[stop, t] - ious[stop, 0] - config.stop_penalty
        left = np.isnan(returns)  # truncated
        returns[left] = ious[left, horizon] - ious[left, 0]
        best[tuple(target)] = returns.max()
    return np.array([best[tuple(t)] for t in np.round(NORMALIZED_BOXES * 16).astype(np.int64)])


@pytest.mark.parametrize(
    "config",
    [
        EpisodeConfig(max_steps=5),
        EpisodeConfig(max_steps=4, stop_penalty=-0.3),  # stopping pays: early stops can be optimal
        EpisodeConfig(max_steps=5, success_iou=0.9, success_bonus=0.3, stop_penalty=0.05),
        EpisodeConfig(max_steps=2),  # success mostly unreachable: best is to drift or stop
    ],
)
def test_optimal_return_matches_exhaustive_enumeration(config):
    targets = np.flatnonzero(STATES[:, 0] > 0)  # every possible target window
    np.testing.assert_allclose(
        optimal_returns(targets, config), brute_force_optimal(config)[targets], atol=1e-12
    )


def test_optimal_return_matches_recursive_search_at_full_horizon():
    """A differently written search (memoised recursion over reference
    windows) at the default horizon 20."""
    config = EpisodeConfig()
    windows = [tuple(int(v) for v in w) for w in zip(*ref_all_windows())]
    # The reference dynamics, tabulated once as a dict for speed: window -> next window per move.
    nxt = {
        a: [tuple(int(v) for v in w) for w in zip(*ref_move(*ref_all_windows(), a))]
        for a in range(6)
    }
    moves = {w: [nxt[a][k] for a in range(6)] for k, w in enumerate(windows)}
    targets = [t for t in range(1, 195) if STATES[t, 0] == 1 or t % 7 == 0]
    for t in targets:
        target = np.round(NORMALIZED_BOXES[t] * 16).astype(np.int64)
        iou = {w: float(ref_iou(box_of(*w), target)) for w in windows}
        assert iou[(0, 0, 16)] < config.success_iou
        value = recursive_value(config, moves, iou)
        assert optimal_returns([t], config)[0] == pytest.approx(
            value((0, 0, 16), config.max_steps), abs=1e-12
        )


def recursive_value(config, moves, iou):
    memo = {}

    def value(window, steps_left):  # best sum of future rewards from a running episode
        if steps_left == 0:
            return 0.0
        key = (window, steps_left)
        if key not in memo:
            best = -config.stop_penalty
            for nw in moves[window]:
                gain = iou[nw] - iou[window]
                if iou[nw] >= config.success_iou:
                    best = max(best, gain + config.success_bonus)
                else:
                    best = max(best, gain + value(nw, steps_left - 1))
            memo[key] = best
        return memo[key]

    return value


def test_oracle_path_achieves_the_optimal_return(train):
    for params in ({}, {"max_steps": 4, "stop_penalty": -0.3}, {"max_steps": 6}):
        env = PatchLocEnv(train, **params)
        for task in range(train.num_tasks):
            env.reset(options={"task_id": task})
            actions = env.optimal_actions(task)
            total = 0.0
            for k, action in enumerate(actions):
                _, reward, terminated, truncated, _ = env.step(action)
                total += reward
                # Ends exactly with the path
                assert (terminated or truncated) == (k == len(actions) - 1)
            assert total == pytest.approx(env.optimal_returns[task], abs=1e-9)
    # With the defaults every target is found: the optimum includes the success bonus.
    assert (train.optimal_returns() > 1.0).all()


# --------------------------------------------------------------------------------------------------
# Policy helpers: the held-out protocol (each task once), an episode's window path, its drawing
# --------------------------------------------------------------------------------------------------
def test_run_tasks_plays_each_task_once_with_the_policy(train):
    seen = []

    def always_stop(obs):  # a batch of observations in, one action per env out
        seen.append(obs.shape)
        return np.full(len(obs), STOP)

    results = run_tasks(train, 7, always_stop, num_envs=3, max_steps=20, seed=0)
    assert set(results) == {"r", "normalized_r", "success"} and all(
        len(v) == 7 for v in results.values()
    )
    assert np.allclose(results["r"], -EpisodeConfig().stop_penalty) and not results["success"].any()
    # 3 envs, one STOP each: 9 episodes, the 7 queued ones counted
    assert seen == [(3, 3, V, V, 3)] * 3
    wide = run_tasks(train, train.num_tasks, lambda obs: np.full(len(obs), STOP), num_envs=50)
    assert len(wide["r"]) == train.num_tasks  # more envs than tasks: min(num_envs, num_tasks) envs


def test_episode_windows_follow_the_policy_and_reach_the_target(train):
    env = PatchLocEnv(train)
    for task in range(3):
        actions = iter(env.optimal_actions(task))
        boxes = episode_windows(
            train, task, lambda obs, path=actions: np.array([next(path)]), max_steps=20, seed=0
        )
        assert np.array_equal(boxes[0], [0.0, 0.0, 1.0, 1.0])  # episodes start on the full image
        assert len(boxes) == len(env.optimal_actions(task)) + 1 and next(actions, None) is None
        # The oracle path ends on the target
        assert ref_iou(boxes[-1], train.target_boxes[task]) >= 0.5


def test_draw_episode_steps_draws_the_path_so_far_after_every_step(train):
    actions = iter(PatchLocEnv(train).optimal_actions(1))
    frames = draw_episode_steps(
        train, 1, lambda obs: np.array([next(actions)]), max_steps=20, seed=0
    )
    boxes = episode_windows(
        train,
        1,
        lambda obs, path=iter(PatchLocEnv(train).optimal_actions(1)): np.array([next(path)]),
    )
    assert len(frames) == len(boxes) >= 2
    for t, frame in enumerate(frames):
        assert np.array_equal(
            frame, draw_episode(train.image(1), boxes[: t + 1], train.target_boxes[1])
        )


def test_draw_episodes_puts_each_drawn_episode_side_by_side(train):
    drawing = draw_episodes(
        train, [2, 0], lambda obs: np.full(len(obs), STOP), max_steps=20, seed=0
    )
    side = train.image(0).shape[0]
    assert drawing.shape == (side, 2 * side, 3) and drawing.dtype == np.uint8
    for panel, task in zip((drawing[:, :side], drawing[:, side:]), (2, 0)):
        full_image = [
            np.array([0.0, 0.0, 1.0, 1.0])
        ] * 2  # STOP at once: the window stays on the full image
        assert np.array_equal(
            panel, draw_episode(train.image(task), full_image, train.target_boxes[task])
        )


# --------------------------------------------------------------------------------------------------
# Task sets and image sources
# --------------------------------------------------------------------------------------------------
def test_same_seed_same_tasks_different_seed_different(sets):
    again = make_task_sets(12, 4, image_size=4 * V, view_size=V, seed=3)
    other = make_task_sets(12, 4, image_size=4 * V, view_size=V, seed=4)
    for a, b, c in zip(sets, again, other):
        for z in range(3):
            np.testing.assert_array_equal(a.levels[z], b.levels[z])
        np.testing.assert_array_equal(a.target_states, b.target_states)
        assert a.image_ids == b.image_ids
        assert not np.array_equal(a.levels[2], c.levels[2])
    # Task i does not depend on how many tasks were asked for.
    fewer, _ = make_task_sets(5, 1, image_size=4 * V, view_size=V, seed=3)
    np.testing.assert_array_equal(fewer.levels[2], sets[0].levels[2][:5])


def task_set_digest(task_set):
    """Hash of everything a task set holds: pyramids, targets, exact
    optimal returns, outline colours."""
    h = hashlib.sha256()
    for level in task_set.levels:
        h.update(np.ascontiguousarray(level).tobytes())
    h.update(task_set.target_states.astype(np.int64).tobytes())
    h.update(np.asarray(task_set.optimal_returns(), dtype=np.float64).tobytes())
    h.update(task_set.outline_colours.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    "num_train, num_test, view_size, seed, digests, train_targets",
    [
        (6, 3, 16, 3, ("1e2e3c8e9fa6fdb4", "22527651b1fde30c"), [15, 185, 14, 1, 4, 22]),
        (3, 2, 32, 0, ("40746c098eced1d6", "f41f91376b3ee366"), [36, 22, 23]),
    ],
)
def test_procedural_task_sets_unchanged(
    num_train, num_test, view_size, seed, digests, train_targets
):
    """Pinned with the code before targets_per_image existed: committed results
    depend on these exact tasks."""
    train, test = make_task_sets(num_train, num_test, view_size=view_size, seed=seed)
    assert train.target_states.tolist() == train_targets
    assert (task_set_digest(train), task_set_digest(test)) == digests
    assert train.image_ids[1] == f"procedural:seed={seed}:train:1"


def test_train_and_test_share_no_image(sets):
    train, test = sets
    assert not set(train.image_ids) & set(test.image_ids)
    for a in train.levels[2]:
        for b in test.levels[2]:
            assert np.abs(a.astype(int) - b).mean() > 10


def test_target_zooms_are_mixed():
    bigger, _ = make_task_sets(200, 1, image_size=4 * V, view_size=V, seed=0)
    zooms = bigger.targets[:, 0]
    # Each zoom is equally likely (not each of the 25 + 169 positions): 100 +- 7 of each expected.
    assert set(zooms) == {1, 2} and 75 <= (zooms == 1).sum() <= 125


def test_procedural_images_have_local_structure():
    side = 4 * 32
    for seed in range(4):
        img = procedural_image(np.random.default_rng(seed), side).astype(np.float32)
        q = side // 16
        windows = [
            img[r * q : r * q + side // 4, c * q : c * q + side // 4]
            for r in range(13)
            for c in range(13)
        ]
        assert min(w.std() for w in windows) > 10  # no flat zoom-2 window
        # Not noise: neighbouring pixels are far more alike than random pairs.
        neighbour = np.abs(np.diff(img, axis=1)).mean()
        shuffled = np.abs(
            img.reshape(-1, 3) - np.random.default_rng(0).permutation(img.reshape(-1, 3))
        ).mean()
        assert neighbour < shuffled / 4


def write_images(folder, sizes, kinds):
    folder.mkdir(exist_ok=True)
    for i, ((w, h), kind) in enumerate(zip(sizes, kinds)):
        img = Image.fromarray(procedural_image(np.random.default_rng(100 + i), max(w, h))).crop(
            (0, 0, w, h)
        )
        img.save(folder / f"img{i:02d}.{kind}", quality=95)


def test_folder_source(tmp_path):
    folder = tmp_path / "images"
    sizes = [(100, 80), (90, 130), (64, 64), (200, 120), (77, 96), (150, 150)]
    write_images(folder, sizes, ["png", "jpg", "png", "jpeg", "JPG", "png"])
    (folder / "notes.txt").write_text("not an image")
    train, test = make_task_sets(3, 2, image_source=folder, image_size=64, view_size=V, seed=0)
    assert train.levels[2].shape == (3, 4 * V, 4 * V, 3) and test.levels[0].shape == (2, V, V, 3)
    names = [str(p) for p in sorted(folder.iterdir()) if p.suffix != ".txt"]
    assert set(train.image_ids) <= set(names) and set(test.image_ids) <= set(names)
    assert not set(train.image_ids) & set(test.image_ids)
    for ts in (train, test):
        for i, name in enumerate(ts.image_ids):  # the center crop of the file, resized
            im = Image.open(name).convert("RGB")
            s = min(im.size)
            box = (
                (im.width - s) // 2,
                (im.height - s) // 2,
                (im.width - s) // 2 + s,
                (im.height - s) // 2 + s,
            )
            ref = np.asarray(
                im.resize((4 * V, 4 * V), Image.Resampling.BILINEAR, box=box), dtype=np.float32
            )
            assert np.abs(ts.image(i) - ref).mean() < 12
    again = make_task_sets(3, 2, image_source=str(folder), image_size=64, view_size=V, seed=0)
    assert again[0].image_ids == train.image_ids and again[1].image_ids == test.image_ids
    env = PatchLocVecEnv(train, num_envs=2)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 3, V, V, 3)


def one_line_error(match, *args, **kwargs):
    with pytest.raises(PatchLocConfigError, match=match) as err:
        make_task_sets(*args, **kwargs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    return str(err.value)


def test_bad_inputs_raise_one_line_errors(tmp_path):
    one_line_error(
        "does not exist", 2, 1, image_source=tmp_path / "missing", image_size=64, view_size=V
    )
    one_line_error("image_source is empty", 2, 1, image_source="", view_size=V)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    one_line_error(
        "holds no .jpg/.jpeg/.png/.tif/.tiff images or .svs/.ndpi/.mrxs/.scn/.bif slides",
        2,
        1,
        image_source=empty,
        image_size=64,
        view_size=V,
    )
    few = tmp_path / "few"
    write_images(few, [(64, 64)] * 2, ["png"] * 2)
    msg = one_line_error(
        "has 2 usable images but 3 are needed", 2, 1, image_source=few, image_size=64, view_size=V
    )
    assert "2 for 2 training tasks + 1 for 1 held-out tasks" in msg and "skipped" not in msg
    # Unusable files are skipped; the error (too few left) counts them by reason and names them.
    corrupt = tmp_path / "corrupt"
    write_images(corrupt, [(64, 64)] * 3, ["png"] * 3)
    (corrupt / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_line_error(
        r"2 usable images but 3 .*skipped 1 unreadable \(img01.png\)",
        2,
        1,
        image_source=corrupt,
        view_size=V,
    )
    small = tmp_path / "small"
    write_images(small, [(64, 64), (70, 50), (80, 64)], ["png"] * 3)
    one_line_error(
        r"skipped 1 smaller than 64 px \(img01.png\)",
        2,
        1,
        image_source=small,
        image_size=64,
        view_size=V,
    )
    flat = tmp_path / "flat"
    write_images(flat, [(64, 64)] * 2, ["png"] * 2)
    Image.new("RGB", (64, 64), (120, 130, 140)).save(flat / "img02.png")
    one_line_error(
        r"skipped 1 near-uniform \(pixel std < 8\) \(img02.png\)",
        2,
        1,
        image_source=flat,
        view_size=V,
    )
    one_line_error("view_size must be a multiple of 4", 2, 1, image_size=64, view_size=18)
    one_line_error(
        r"image_size \(60\) must be >= 4 \* view_size \(64\)", 2, 1, image_size=60, view_size=V
    )
    one_line_error("num_train_tasks must be an integer >= 1", 0, 1, image_size=64, view_size=V)
    one_line_error("num_test_tasks must be an integer >= 1", 2, -1, image_size=64, view_size=V)
    one_line_error("target_zooms", 2, 1, image_size=64, view_size=V, target_zooms=(0,))


def test_bad_env_arguments(train):
    with pytest.raises(PatchLocConfigError, match="success_iou must be in"):
        PatchLocEnv(train, success_iou=0.25)
    with pytest.raises(PatchLocConfigError, match="max_steps"):
        PatchLocVecEnv(train, 2, max_steps=0)
    env = PatchLocVecEnv(train, 2)
    with pytest.raises(PatchLocConfigError, match="task_ids"):
        env.reset(options={"task_ids": [0]})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="actions"):
        env.step(np.array([0, 7]))


@pytest.mark.parametrize(
    "action", [1.5, 2.0, np.float32(1), True, np.bool_(False), 7, -1, "1", None, [1], np.array([1])]
)
def test_single_env_step_refuses_anything_but_an_integer_action(train, action):
    """Like gymnasium's Discrete(7).contains: an int or numpy integer in 0..6 (1.5 is not 1)."""
    env = PatchLocEnv(train)
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match=r"expected one action: integers in 0\.\.6 \(up, down"
    ) as e:
        env.step(action)
    assert "\n" not in str(e.value) and env.window == (0, 0, 0)  # nothing moved
    for zoom_in in (4, np.int32(4), np.int64(4), np.array(4), np.uint8(4)):
        env.reset(seed=0)
        env.step(zoom_in)
        assert env.window == (1, 2, 2)


@pytest.mark.parametrize(
    "actions",
    [
        [0, 1],  # too few
        [0, 1, 2, 3],  # too many
        [0.0, 1.0, 2.0],  # floats, even whole ones
        [True, False, True],
        [0, 1, 7],
        np.full(3, -1),
        np.arange(300),  # shown shortened, on one line
    ],
)
def test_vector_env_step_refuses_bad_actions(train, actions):
    env = PatchLocVecEnv(train, 3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected 3 actions \(one per env\): integers in 0\.\.6"):
        env.step(actions)
    with pytest.raises(ValueError) as e:
        env.step(actions)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    env.step([0, 1, 2])  # lists, int32 arrays and (3, 1) arrays of integers are fine
    env.step(np.array([[4], [5], [6]], dtype=np.int32))


# --------------------------------------------------------------------------------------------------
# Vector env
# --------------------------------------------------------------------------------------------------
def run_random(env, steps, seed, actions_rng=None):
    rng = actions_rng or np.random.default_rng(seed)
    trace = [env.reset(seed=seed)[0]]
    for _ in range(steps):
        obs, reward, term, trunc, infos = env.step(rng.integers(7, size=env.num_envs))
        trace += [obs, reward, term, trunc, env.tasks]
    return trace


def test_vec_env_autoreset_and_episode_statistics(train):
    n = 4
    env = PatchLocVecEnv(train, num_envs=n, max_steps=8)
    obs, infos = env.reset(seed=5)
    rng = np.random.default_rng(5)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    prev_obs, ended_count = obs, 0
    outcomes = set()
    for _ in range(300):
        tasks_before = env.tasks
        actions = rng.choice(7, size=n, p=[0.12, 0.12, 0.12, 0.12, 0.3, 0.1, 0.12])
        obs, reward, term, trunc, infos = env.step(actions)
        assert reward.dtype == np.float32 and reward.shape == (n,)
        returns += reward
        lengths += 1
        done = term | trunc
        assert ("episode" in infos) == done.any()
        # Every env's obs shows its current task and window, whether or not it was reset
        for i in range(n):
            task, window = env.tasks[i], env.windows()[i]
            np.testing.assert_array_equal(obs[i, 0], train.target_patch(task))
            np.testing.assert_array_equal(obs[i, 2], train.view(task, state_index(*window)))
        if done.any():
            ep, mask = infos["episode"], infos["_episode"]
            np.testing.assert_array_equal(mask, done)
            for i in np.flatnonzero(done):
                ended_count += 1
                task = tasks_before[i]
                assert ep["task_id"][i] == task
                assert ep["r"][i] == pytest.approx(returns[i], abs=1e-5)
                assert ep["l"][i] == lengths[i] and (lengths[i] == 8 or term[i])
                assert ep["normalized_r"][i] == pytest.approx(
                    returns[i] / env.optimal_returns[task], abs=1e-5
                )
                assert ep["success"][i] == (term[i] and actions[i] != STOP)
                assert ep["stopped"][i] == (actions[i] == STOP)
                outcomes.add(
                    "success" if ep["success"][i] else "stop" if ep["stopped"][i] else "truncated"
                )
                # Same-step auto-reset: the obs is the first obs of the next episode ...
                new_task = env.tasks[i]
                assert tuple(env.windows()[i]) == (0, 0, 0)
                np.testing.assert_array_equal(obs[i, 0], train.target_patch(new_task))
                np.testing.assert_array_equal(obs[i, 2], train.levels[0][new_task])
                # ... and the last obs of the finished one is in final_obs (same target, moved
                # window unless stop at once).
                np.testing.assert_array_equal(infos["final_obs"][i][0], prev_obs[i, 0])
                returns[i], lengths[i] = 0.0, 0
            assert all(infos["final_obs"][i] is None for i in np.flatnonzero(~done))
        prev_obs = obs
    assert ended_count > 30 and outcomes == {"success", "stop", "truncated"}


def test_vec_env_task_ids_option_and_queue(train):
    env = PatchLocVecEnv(train, num_envs=3)
    obs, infos = env.reset(seed=0, options={"task_ids": [5, 0, 7]})
    np.testing.assert_array_equal(env.tasks, [5, 0, 7])
    np.testing.assert_array_equal(infos["task_id"], [5, 0, 7])
    for i, t in enumerate([5, 0, 7]):
        np.testing.assert_array_equal(obs[i, 0], train.target_patch(t))
    # Held-out style evaluation: every task once, through the queue.
    all_ids = np.arange(train.num_tasks)
    env.reset(seed=1, options={"task_ids": all_ids})
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(500):
        _, _, _, _, infos = env.step(rng.integers(7, size=3))
        if "episode" in infos:
            ep = infos["episode"]
            seen += list(ep["task_id"][infos["_episode"] & ep["from_queue"]])
    assert sorted(seen) == list(all_ids)


def test_vec_env_determinism_by_seed(train):
    a = run_random(PatchLocVecEnv(train, num_envs=4), 200, seed=11)
    b = run_random(PatchLocVecEnv(train, num_envs=4), 200, seed=11)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = run_random(
        PatchLocVecEnv(train, num_envs=4), 200, seed=12, actions_rng=np.random.default_rng(11)
    )
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_vec_env_get_state_set_state_resumes_exactly(train):
    env = PatchLocVecEnv(train, num_envs=3)
    env.reset(seed=2, options={"task_ids": np.arange(8)})
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.step(rng.integers(7, size=3))
    state = env.get_state()
    assert all(
        isinstance(v, np.ndarray) and v.dtype in (np.int64, np.float64, bool)
        for v in state.values()
    )
    saved = {k: v.copy() for k, v in state.items()}
    resumed = PatchLocVecEnv(train, num_envs=3)
    resumed.reset(seed=99)  # a different history: everything must come from the saved state
    resumed.set_state(saved)
    actions = rng.integers(7, size=(100, 3))
    for a in actions:
        x, y = env.step(a), resumed.step(a)
        for u, w in zip(x[:4], y[:4]):
            np.testing.assert_array_equal(u, w)
        assert ("episode" in x[4]) == ("episode" in y[4])
        if "episode" in x[4]:
            for key in x[4]["episode"]:
                np.testing.assert_array_equal(x[4]["episode"][key], y[4]["episode"][key])
    with pytest.raises(PatchLocConfigError, match="saved env state is for 3 envs"):
        PatchLocVecEnv(train, num_envs=2).set_state(saved)


def test_vec_env_window_boxes_and_targets(train):
    env = PatchLocVecEnv(train, num_envs=2)
    small_targets = np.flatnonzero(train.targets[:, 0] == 2)[
        :2
    ]  # IoU <= 0.25 with any m/2 window: no success
    env.reset(seed=0, options={"task_ids": small_targets})
    np.testing.assert_allclose(env.window_boxes(), [[0, 0, 1, 1]] * 2)
    env.step(np.array([ZOOM_IN, ZOOM_IN]))
    env.step(np.array([RIGHT, DOWN]))
    np.testing.assert_allclose(
        env.window_boxes(), [[0.25, 0.375, 0.75, 0.875], [0.375, 0.25, 0.875, 0.75]]
    )
    assert train.target_boxes.shape == (train.num_tasks, 4)
    assert ((train.target_boxes >= 0) & (train.target_boxes <= 1)).all()
    assert train.image(0).shape == (4 * V, 4 * V, 3) and train.image(0).dtype == np.uint8
    assert train.nbytes == train.num_tasks * 21 * V * V * 3
