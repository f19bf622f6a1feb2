"""Window lattice of the patch-localization task: states, moves, IoU and the exact optimal return.

Geometry only (no pixels, no images). Everything is measured in *units* of m/16, where m is the
image side: a window at zoom z has side 16/2^z units (16, 8, 4) and moves on a lattice of a quarter
of its side, 4/2^z units (4, 2, 1). Its top-left corner is (row, col) * 4/2^z units with row, col in
0..4*(2^z - 1), so zoom 0 has 1 position, zoom 1 has 5x5 and zoom 2 has 13x13: 195 window states in
all. A target is itself a lattice window at zoom 1 or 2, hence an exact match is always reachable.

Since states are few, the whole dynamics is a (195, 7) transition table and the IoU of every
(target, window) pair a (195, 195) matrix: stepping an env is two table look-ups.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Actions, in the order of the Discrete(7) action space.
UP, DOWN, LEFT, RIGHT, ZOOM_IN, ZOOM_OUT, STOP = range(7)
NUM_ACTIONS = 7
ACTION_NAMES = ("up", "down", "left", "right", "zoom_in", "zoom_out", "stop")

NUM_ZOOMS = 3
UNITS = 16  # the image side, in lattice units (zoom-2 lattice step = 1 unit = m/16)


def lattice_size(zoom: int) -> int:
    """Number of row (or column) positions of a window at this zoom: 1, 5, 13."""
    return 4 * (2**zoom - 1) + 1


# State index: zoom 0 -> 0, zoom 1 -> 1..25, zoom 2 -> 26..194 (row-major inside a zoom level).
ZOOM_OFFSET = np.cumsum([0] + [lattice_size(z) ** 2 for z in range(NUM_ZOOMS)])[:NUM_ZOOMS]
NUM_STATES = int(sum(lattice_size(z) ** 2 for z in range(NUM_ZOOMS)))  # 195
INITIAL_STATE = 0  # the full image


def state_index(zoom, row, col):
    """(zoom, row, col) -> state index; works elementwise on arrays."""
    zoom = np.asarray(zoom)
    n = 4 * (2**zoom - 1) + 1
    return ZOOM_OFFSET[zoom] + np.asarray(row) * n + np.asarray(col)


def _build_states() -> np.ndarray:
    zrc = [
        (z, r, c)
        for z in range(NUM_ZOOMS)
        for r in range(lattice_size(z))
        for c in range(lattice_size(z))
    ]
    return np.array(zrc, dtype=np.int64)


STATES = _build_states()  # (195, 3) int: zoom, row, col
STATES.flags.writeable = False
_Z, _R, _C = STATES.T
_STEP = 4 >> _Z  # lattice step, in units
_SIDE = UNITS >> _Z  # window side, in units
# (195, 4) y0, x0, y1, x1
BOXES = np.stack([_R * _STEP, _C * _STEP, _R * _STEP + _SIDE, _C * _STEP + _SIDE], axis=1)
BOXES.flags.writeable = False
NORMALIZED_BOXES = BOXES / UNITS  # (195, 4) in [0, 1], y1/x1 exclusive
NORMALIZED_BOXES.flags.writeable = False


def _move(zoom: int, row: int, col: int, action: int) -> tuple[int, int, int]:
    """One action on one window (the definition of the dynamics; tabulated below)."""
    last = lattice_size(zoom) - 1
    if action == UP:
        row = max(row - 1, 0)
    elif action == DOWN:
        row = min(row + 1, last)
    elif action == LEFT:
        col = max(col - 1, 0)
    elif action == RIGHT:
        col = min(col + 1, last)
    elif action == ZOOM_IN and zoom < NUM_ZOOMS - 1:
        # The centre is at (row + 2) * step; at zoom + 1 the step halves and the side
        # becomes 4 new steps, so the new top-left is (row + 2) * 2 - 2 = 2 * row + 2 new
        # steps: always exact and inside.
        zoom, row, col = zoom + 1, 2 * row + 2, 2 * col + 2
    elif action == ZOOM_OUT and zoom > 0:
        # Inverse of the above: the exact new position is (row - 2) / 2. For odd rows it
        # falls between two lattice points; round towards the image centre (symmetric
        # under mirroring), then clamp.
        zoom -= 1
        new_last = lattice_size(zoom) - 1
        row, col = (min(max((v - 2 + int(v - 2 < new_last)) // 2, 0), new_last) for v in (row, col))
    # STOP and no-op zooms leave the window where it is.
    return zoom, row, col


def _build_transitions() -> np.ndarray:
    table = np.empty((NUM_STATES, NUM_ACTIONS), dtype=np.int64)
    for s, (z, r, c) in enumerate(STATES.tolist()):
        for a in range(NUM_ACTIONS):
            table[s, a] = state_index(*_move(z, r, c, a))
    return table


TRANSITIONS = _build_transitions()  # (195, 7): next state index
TRANSITIONS.flags.writeable = False


def _build_iou() -> np.ndarray:
    a, b = BOXES[:, None, :], BOXES[None, :, :]
    inter_h = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_w = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_h * inter_w
    area = (BOXES[:, 2] - BOXES[:, 0]) * (BOXES[:, 3] - BOXES[:, 1])
    return inter / (area[:, None] + area[None, :] - inter)


IOU = _build_iou()  # (195, 195) float64: IOU[target_state, window_state]
IOU.flags.writeable = False


@dataclass(frozen=True)
class EpisodeConfig:
    """Episode and reward parameters (see PatchLocEnv for why these defaults)."""

    max_steps: int = 20
    success_iou: float = 0.5
    success_bonus: float = 1.0
    stop_penalty: float = 0.2


def _reachable(config: EpisodeConfig, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breadth-first layers over window states, for several targets at once.

    reach[d, t, s]: window state s can be occupied after exactly d moves while the episode is still
    running before it (no earlier state reached success_iou). success[t, s]: s ends the episode.
    """
    success = IOU[targets] >= config.success_iou  # (T, 195)
    adjacency = np.zeros((NUM_STATES, NUM_STATES))
    adjacency[np.repeat(np.arange(NUM_STATES), NUM_ACTIONS - 1), TRANSITIONS[:, :STOP].ravel()] = (
        1.0
    )
    reach = np.zeros((config.max_steps + 1, len(targets), NUM_STATES), dtype=bool)
    reach[0, :, INITIAL_STATE] = True
    for d in range(config.max_steps):
        reach[d + 1] = (
            (reach[d] & ~success) @ adjacency
        ) > 0  # success states are terminal: not expanded
    return reach, success


def _episode_endings(config: EpisodeConfig, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of every way an episode can end, as (depth, target, state, kind) with
    kind 0 success, 1 stop, 2 timeout.

    Returns (reach, values) with values (H+1, T, 195, 3), -inf where that ending is
    impossible. Returns telescope, so an ending's value is IoU_final - IoU_initial + bonus *
    [success] - penalty * [stopped].
    """
    reach, success = _reachable(config, targets)
    iou = IOU[targets]  # (T, 195)
    gain = iou - iou[:, INITIAL_STATE : INITIAL_STATE + 1]
    horizon = config.max_steps
    values = np.full(reach.shape + (3,), -np.inf)
    depth = np.arange(horizon + 1)[:, None, None]
    values[..., 0] = np.where(reach & success & (depth >= 1), gain + config.success_bonus, -np.inf)
    # Stop is an action, so it needs a step left; the state before it must not be a success state.
    values[..., 1] = np.where(
        reach & ~success & (depth < horizon), gain - config.stop_penalty, -np.inf
    )
    values[..., 2] = np.where(reach & ~success & (depth == horizon), gain, -np.inf)
    return reach, values


@lru_cache(maxsize=16)
def _optimal_returns_by_target(config: EpisodeConfig) -> np.ndarray:
    _, values = _episode_endings(config, np.arange(NUM_STATES))
    best = values.max(axis=(0, 2, 3))
    best.flags.writeable = False
    return best  # (195,): optimal return when the target is state t


def optimal_returns(
    target_states: np.ndarray, config: EpisodeConfig = EpisodeConfig()
) -> np.ndarray:
    """Exact optimal (undiscounted) episode return for each target
    state (array of state indices)."""
    return _optimal_returns_by_target(config)[np.asarray(target_states)]


def optimal_actions(target_state: int, config: EpisodeConfig = EpisodeConfig()) -> list[int]:
    """An action sequence achieving the optimal return for this target
    (shortest among optimal ones)."""
    reach, values = _episode_endings(config, np.array([int(target_state)]))
    reach, values = reach[:, 0], values[:, 0]  # (H+1, 195), (H+1, 195, 3)
    best = values.max()
    # First (shallowest) ending with the optimal value: argmax over the
    # flattened (depth, state, kind).
    depth, state, kind = np.unravel_index(int(np.argmax(values >= best - 1e-12)), values.shape)
    success = IOU[target_state] >= config.success_iou
    actions = [STOP] if kind == 1 else []
    for d in range(depth, 0, -1):  # walk back through states that keep the episode running
        prev = np.flatnonzero(
            reach[d - 1] & ~success & (TRANSITIONS[:, :STOP] == state).any(axis=1)
        )[0]
        actions.append(int(np.flatnonzero(TRANSITIONS[prev, :STOP] == state)[0]))
        state = prev
    return actions[::-1]
