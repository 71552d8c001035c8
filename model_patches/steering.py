"""Prompt switches while a video is being made: live (the live view's steering route) or replayed
from a run's log.

A `Steering` holds the prompts a run may switch to (its slots, encoded before the run), and a
request to end the video early (after the next finished window or chunk; the video so far is the
run's result). It decides nothing about timing: the family's run asks `at_boundary(call, piece)` where a switch may
take effect (SkyReels-V2-DF: the first row of a new block; sync windows have one, at the window's
start; MAGI-1: a chunk entering the window), and the switch applies from that call on. The log
names the call, so a replay applies the same switches at the same calls and reproduces the run
bit for bit, however late or early the live requests arrived.
"""
from __future__ import annotations

import json
import threading
import time

import comfy.samplers

from ..cache_core.errors import InputError


class Mailbox:
    """The newest pending switch of one run, written by the server's thread and taken by the run's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slot = None
        self.finish = threading.Event()      # "that is enough": end at the next finished window/chunk

    def put(self, slot: int) -> None:
        with self._lock:
            self._slot = slot

    def take(self):
        with self._lock:
            slot, self._slot = self._slot, None
            return slot


def parse_replay(text: str, slots: int) -> dict[tuple[int, int], int] | None:
    """A steered run's switches, from its report (the whole JSON or its "switches" list), as
    {(call, piece): slot}; None for an empty text. Named errors for anything else."""
    text = (text or "").strip()
    if not text:
        return None
    fix = "paste the `switches` list (or the whole report) of the run to reproduce, or clear replay"
    try:
        data = json.loads(text)
    except ValueError:
        raise InputError("replay", f"is not JSON: {fix}") from None
    if isinstance(data, dict):
        data = data.get("switches")
    if not isinstance(data, list):
        raise InputError("replay", f"holds no switches list: {fix}")
    out = {}
    for entry in data:
        call, piece, slot = (entry.get(k) if isinstance(entry, dict) else None for k in ("call", "piece", "slot"))
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (call, piece, slot)):
            raise InputError("replay", f"entry {entry!r} is not a switch {{\"call\": int, \"piece\": int, "
                             f"\"slot\": int}}: {fix}")
        if not 0 <= slot < slots:
            raise InputError("replay", f"switches to prompt slot {slot}, but the live view has {slots} prompt(s) "
                             "(slots count from 0): give it the same prompts as the logged run")
        out[(call, piece)] = slot
    return out


class Steering:
    """The switches of one run (see the module docstring). `active` is the slot in use (None: the
    sampler's own prompt or storyboard); `log` the switches applied, as the report keeps them."""

    def __init__(self, slots: list, replay: dict[tuple[int, int], int] | None = None, mailbox: Mailbox | None = None,
                 on_switch=None):
        self.slots, self.replay = slots, replay
        self.mailbox = mailbox if replay is None else None      # a replay takes no live requests
        self.on_switch = on_switch
        self.active = None
        self.log: list[dict] = []
        self.finished = None         # where the run ended early on request, or None
        self._t0 = time.perf_counter()

    def at_boundary(self, call: int, piece: int) -> bool:
        """A point where a switch may take effect; True when the prompt changes from this call on."""
        if self.replay is not None:
            slot = self.replay.pop((call, piece), None)
        else:
            slot = self.mailbox.take() if self.mailbox is not None else None
        if slot is None or slot == self.active:
            return False
        self.active = slot
        entry = {"call": call, "piece": piece, "slot": slot, "t_s": round(time.perf_counter() - self._t0, 4)}
        self.log.append(entry)
        if self.on_switch is not None:
            self.on_switch(entry)
        return True

    def check_replayed(self) -> None:
        """At the end of a replay: every logged switch must have met a boundary."""
        if self.replay:
            calls = ", ".join(str(c) for c, _ in sorted(self.replay))
            raise InputError("replay", f"switches at call(s) {calls} never met a point where a prompt can change: "
                             "the logged run had other settings (schedule, steps, length); replay it with the same ones")

    @property
    def switches(self) -> int:
        """Switches applied so far: the caches start a new segment at each."""
        return len(self.log)

    def finish_requested(self, call: int, piece: int) -> bool:
        """After a finished window (DF) or chunk (MAGI-1): True when the user asked to end here. The
        video so far is the run's result, logged as `finished_early`."""
        if self.mailbox is None or not self.mailbox.finish.is_set():
            return False
        self.finished = {"call": call, "piece": piece, "t_s": round(time.perf_counter() - self._t0, 4)}
        return True

    def prompt(self, default):
        """The prompt in use: the active slot's, or `default` (the sampler's own for this piece)."""
        return default if self.active is None else self.slots[self.active]


class SteeredGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose positive is the steering's active slot, read at every model call: every slot
    is processed with the window's conds once, so a switch between two rows costs nothing."""

    def __init__(self, model_patcher, steering: Steering):
        super().__init__(model_patcher)
        self.steering = steering

    @staticmethod
    def key(slot) -> str:
        return "positive" if slot is None else f"arcache_slot_{slot}"

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        conds.update({self.key(i): slot for i, slot in enumerate(self.steering.slots)})
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.sampling_function(
            self.inner_model, x, timestep, self.conds.get("negative", None),
            self.conds.get(self.key(self.steering.active), None), self.cfg, model_options=model_options, seed=seed)
