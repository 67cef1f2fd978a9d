"""The serving loop's clock, a collaborator: the same loop (sim/engine.py) runs on
simulated time in the simulator and on the wall clock in the replayer.

SimPy's RealtimeEnvironment is the idea: the same processes, with events held back
until the wall clock reaches them. What differs is how long a step lasts:
- VirtualClock: the step lasts what the cost model says; a lone request's decode steps
  may be planned as one event (decode runs), since no time is lived;
- WallClock: the step lasts until the wall clock says it ended: its execution plus the
  loop's own work since the previous event (admission, planning), as a server lives it;
  every step is executed, so there are no decode runs.
"""
from __future__ import annotations

from time import monotonic

import simpy
import simpy.rt


class VirtualClock:
    decode_runs = True

    def environment(self) -> simpy.Environment:
        return simpy.Environment()

    def step_s(self, env, duration_s: float) -> float:
        """How far the clock moves for a step whose execution took duration_s."""
        return duration_s

    def elapsed_s(self, env) -> float:
        """Time since the run began."""
        return float(env.now)


class WallClock:
    decode_runs = False

    def environment(self) -> simpy.rt.RealtimeEnvironment:
        # strict=False: a step that overruns its event is how real time goes, not an error.
        return simpy.rt.RealtimeEnvironment(factor=1.0, strict=False)

    def step_s(self, env, duration_s: float) -> float:
        return max(0.0, self.elapsed_s(env) - env.now)

    def elapsed_s(self, env) -> float:
        return monotonic() - env.real_start
