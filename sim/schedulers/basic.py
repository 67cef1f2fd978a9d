"""First-come-first-served, shortest-job-first and earliest-deadline-first."""
from sim.schedulers.base import Scheduler


class FCFS(Scheduler):
    """vLLM's default: arrival order."""
    name = "fcfs"


class SJF(Scheduler):
    """Shortest expected job first, by the task's expected output length (what a
    server can know before generating), then arrival."""
    name = "sjf"

    def key(self, req, now):
        return (req.expected_output, req.arrival_s, req.index)


class EDF(Scheduler):
    """Earliest deadline first: the first-token deadline (arrival + TTFT SLO), falling
    back to the end-to-end deadline."""
    name = "edf"

    def key(self, req, now):
        d = req.deadline("ttft_s")
        if d == float("inf"):
            d = req.deadline("e2e_s")
        return (d, req.arrival_s, req.index)
