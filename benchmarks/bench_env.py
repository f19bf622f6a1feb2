"""Speed and memory of the patch-localization env: PatchLocVecEnv vs a
naive implementation, side by side.

The naive env (written below) is what one writes first: keep every full m x m image, and on every
step crop the window and resize it to V x V with PIL, and resize the full image again for the
overview. PatchLocVecEnv precomputes one pyramid per task so that every view is an array slice.

    python benchmarks/bench_env.py --num-envs 4 --view-size 112 --steps 20000 --num-tasks 64

Runs on one core (sched_setaffinity) with random actions (stop included, so episodes end and reset).
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: no hidden BLAS threads

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs import PatchLocVecEnv, make_task_sets


class NaiveVecEnv:
    """Same task and rewards (default parameters), rendered the slow way: crop + resize every
    step."""

    def __init__(self, images, targets, num_envs, view_size, seed=0):
        # PIL m x m images; (zoom, row, col)
        self.images, self.targets, self.v = images, targets, view_size
        self.m = images[0].width
        self.rng = np.random.default_rng(seed)
        self.envs = [self._reset() for _ in range(num_envs)]

    def _box(self, zoom, row, col):
        side = self.m >> zoom
        return row * side // 4, col * side // 4, row * side // 4 + side, col * side // 4 + side

    def _iou(self, a, b):
        ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = ih * iw
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def _crop(self, task, box):
        y0, x0, y1, x1 = box
        return self.images[task].resize(
            (self.v, self.v), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)
        )

    def _reset(self):
        task = int(self.rng.integers(len(self.images)))
        env = {
            "task": task,
            "window": (0, 0, 0),
            "t": 0,
            "target_box": self._box(*self.targets[task]),
        }
        env["target_view"] = np.asarray(self._crop(task, env["target_box"]))
        env["iou"] = self._iou(self._box(0, 0, 0), env["target_box"])
        return env

    def _obs(self, env):
        box = self._box(*env["window"])
        overview = self.images[env["task"]].resize((self.v, self.v), Image.Resampling.BILINEAR)
        scale = self.v / self.m
        ImageDraw.Draw(overview).rectangle(
            [box[1] * scale, box[0] * scale, box[3] * scale - 1, box[2] * scale - 1],
            outline=(255, 0, 255),
        )
        return np.stack(
            [env["target_view"], np.asarray(overview), np.asarray(self._crop(env["task"], box))]
        )

    def step(self, actions):
        obs, rewards, dones = [], [], []
        for k, (env, a) in enumerate(zip(self.envs, actions)):
            zoom, row, col = env["window"]
            last = 4 * (2**zoom - 1)
            if a in (0, 1):
                row = min(max(row + (1 if a == 1 else -1), 0), last)
            elif a in (2, 3):
                col = min(max(col + (1 if a == 3 else -1), 0), last)
            elif a == 4 and zoom < 2:
                zoom, row, col = zoom + 1, 2 * row + 2, 2 * col + 2
            elif a == 5 and zoom > 0:
                zoom -= 1
                new_last = 4 * (2**zoom - 1)
                row, col = (
                    min(max((v - 2 + (v - 2 < new_last)) // 2, 0), new_last) for v in (row, col)
                )
            env["window"], env["t"] = (zoom, row, col), env["t"] + 1
            iou = self._iou(self._box(*env["window"]), env["target_box"])
            reward, env["iou"] = iou - env["iou"], iou
            success = iou >= 0.5
            reward += 1.0 * success - 0.2 * (a == 6)
            done = success or a == 6 or env["t"] >= 20
            if done:
                env = self.envs[k] = self._reset()
            obs.append(self._obs(env))
            rewards.append(reward)
            dones.append(done)
        return np.stack(obs), np.array(rewards, dtype=np.float32), np.array(dones)


def steps_per_second(step, num_envs, calls, seed=0):
    rng = np.random.default_rng(seed)
    actions = rng.integers(7, size=(calls, num_envs))
    start = time.perf_counter()
    for k in range(calls):
        step(actions[k])
    return calls * num_envs / (time.perf_counter() - start)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--view-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=20000, help="step() calls of PatchLocVecEnv")
    parser.add_argument(
        "--naive-steps", type=int, default=300, help="step() calls of the naive env (it is slow)"
    )
    parser.add_argument("--num-tasks", type=int, default=64)
    parser.add_argument(
        "--image-size", type=int, default=1024, help="m: the naive env keeps m x m images"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="best of this many timed runs of each"
    )
    args = parser.parse_args()
    n, v, m = args.num_envs, args.view_size, args.image_size

    pinned = hasattr(os, "sched_setaffinity")
    if pinned:
        os.sched_setaffinity(0, {0})
    print(f"CPU: {cpu_model()} | pinned to one core: {pinned} | numpy {np.__version__}")

    start = time.perf_counter()
    tasks, _ = make_task_sets(
        args.num_tasks, 1, image_size=args.image_size, view_size=args.view_size, seed=0
    )
    build_s = time.perf_counter() - start
    fast = PatchLocVecEnv(tasks, args.num_envs)
    fast.reset(seed=0)

    # The naive env gets the same images at full resolution m (upsampled from the pyramid top:
    # content is irrelevant to the cost of resizing).
    images = [
        Image.fromarray(tasks.image(i)).resize((m, m), Image.Resampling.BILINEAR)
        for i in range(len(tasks))
    ]
    naive = NaiveVecEnv(images, [tuple(t) for t in tasks.targets], args.num_envs, args.view_size)

    fast_sps = max(
        steps_per_second(fast.step, args.num_envs, args.steps, seed=r) for r in range(args.repeats)
    )
    naive_sps = max(
        steps_per_second(naive.step, args.num_envs, args.naive_steps, seed=r)
        for r in range(args.repeats)
    )

    per_task = tasks.nbytes / len(tasks)
    naive_per_task = m * m * 3
    print(
        f"task set       : {args.num_tasks} procedural, {build_s:.2f} s "
        f"({build_s / args.num_tasks * 1e3:.1f} ms each)"
    )
    print(f"PatchLocVecEnv : {fast_sps:10,.0f} env steps/s ({n} envs, V={v}, {args.steps} calls)")
    print(
        f"naive (PIL)    : {naive_sps:10,.0f} env steps/s ({n} envs, V={v}, m={m}, "
        f"{args.naive_steps} calls)"
    )
    print(f"speed-up       : {fast_sps / naive_sps:10.1f} x")
    print(
        f"memory per task: {per_task:,.0f} bytes of pyramid = (V^2 + 4V^2 + 16V^2) x 3 (naive m x "
        f"m: {naive_per_task:,})"
    )
    mib = 1024 / 2**20
    print(
        f"1024 tasks     : {per_task * mib:,.0f} MiB of pyramids (naive, m={m}: "
        f"{naive_per_task * mib:,.0f} MiB)"
    )


if __name__ == "__main__":
    main()
