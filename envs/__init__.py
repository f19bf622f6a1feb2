"""Patch localization: find where a target patch lies in an image by moving and zooming a window.

A task is an image (side m) and a target crop of side m/2 or m/4 aligned to the window lattice, so
an exact match is reachable. The agent's window has side m, m/2 or m/4 (zoom 0, 1, 2) and moves by a
quarter of its side; episodes start on the full image. Observation: uint8 (3, V, V, 3) = target
patch, overview with the window outlined, current view (V = 112 by default). Reward: IoU improvement
per step; success (+1) as soon as IoU >= 0.5; `stop` gives up (-0.2); at most 20 steps. Optimal
returns are exact.

    import envs, gymnasium as gym          # importing envs registers "PatchLoc-v0"
    env = gym.make("PatchLoc-v0", image_source="path/to/images", num_tasks=256,
                   targets_per_image=4, seed=1)
    envs = gym.make_vec("PatchLoc-v0", num_envs=4)  # native PatchLocVecEnv (procedural by default)
    test_env = gym.make("PatchLoc-v0", split="test", num_tasks=256, num_test_tasks=64)  # held out
    # render: image, target, window
    check_env(gym.make("PatchLoc-v0", render_mode="rgb_array").unwrapped)

    # task i on image i // targets_per_image; the two sets never share an image
    train, test = make_task_sets(256, 64, image_source="procedural" or "path/to/images",
                                 view_size=112, seed=1, targets_per_image=1)
    envs = PatchLocVecEnv(train, num_envs=4)   # gymnasium VectorEnv, same-step auto-reset
    obs, infos = envs.reset(seed=1)            # options={"task_ids": ids} forces / queues tasks
    obs, rewards, terminations, truncations, infos = envs.step(actions)  # actions: ints in 0..6
    infos["episode"]["normalized_r"][infos["_episode"]]                  # return / optimal return
    # (y0, x0, y1, x1) in [0, 1]; a (4V, 4V, 3) image
    envs.window_boxes(), train.target_boxes, train.image(i)
    env = PatchLocEnv(train)                   # single gymnasium.Env, reset(options={"task_id": i})
    PatchLocEnv(num_tasks=64, view_size=112)   # both envs take task-set settings instead of a set
    # exact optimum (BFS over 195 windows), oracle path
    train.optimal_returns(), train.optimal_actions(i)
    # each task once under act (obs -> actions): r, normalized_r, success
    run_tasks(test, 64, act)
    draw_episodes(test, range(4), act)  # each episode's window path on its image, side by side
    draw_episode_steps(test, 0, act)    # one episode drawn after every step: a video's frames
    PatchLocConfigError                 # ValueError with a one-line message on bad input

    # whole-slide images (envs/slides.py, docs/slides.md): regions of tissue at 2 um/px
    train, test = make_task_sets(2048, 500, image_source="/data/slides", slide_mpp=2.0,
                                 regions_per_slide=32, min_tissue=0.5)
    write_tasks_json("runs/NAME/tasks.json", train, test)  # each task's file, level, region, MPP
Actions: UP, DOWN, LEFT, RIGHT, ZOOM_IN, ZOOM_OUT, STOP = 0..6.
"""

import gymnasium

from envs.images import PatchLocConfigError, procedural_image
from envs.lattice import (
    ACTION_NAMES,
    DOWN,
    LEFT,
    NUM_ACTIONS,
    RIGHT,
    STOP,
    UP,
    ZOOM_IN,
    ZOOM_OUT,
    EpisodeConfig,
)
from envs.patchloc import (
    PatchLocEnv,
    PatchLocVecEnv,
    TaskSet,
    draw_episode,
    draw_episode_steps,
    draw_episodes,
    episode_windows,
    make_task_set,
    make_task_sets,
    run_tasks,
    write_tasks_json,
)

ENV_ID = "PatchLoc-v0"
# A re-import must not re-register (gymnasium warns on overrides). No max_episode_steps here: the
# env truncates itself at max_steps, which its exact optimal returns assume.
if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="envs.patchloc:PatchLocEnv",
        vector_entry_point="envs.patchloc:PatchLocVecEnv",
    )

__all__ = [
    "ACTION_NAMES",
    "DOWN",
    "LEFT",
    "NUM_ACTIONS",
    "RIGHT",
    "STOP",
    "UP",
    "ZOOM_IN",
    "ZOOM_OUT",
    "ENV_ID",
    "EpisodeConfig",
    "PatchLocConfigError",
    "PatchLocEnv",
    "PatchLocVecEnv",
    "TaskSet",
    "draw_episode",
    "draw_episode_steps",
    "draw_episodes",
    "episode_windows",
    "make_task_set",
    "make_task_sets",
    "procedural_image",
    "run_tasks",
    "write_tasks_json",
]
