"""Request schedulers, by name. Add one: subclass Scheduler, register it here."""
from sim.schedulers.base import Scheduler
from sim.schedulers.basic import EDF, FCFS, SJF
from sim.schedulers.emoe import EmoeScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {s.name: s for s in (FCFS, SJF, EDF, EmoeScheduler)}


def make_scheduler(spec: dict) -> Scheduler:
    return SCHEDULERS[spec["name"]]({k: v for k, v in spec.items() if k != "name"})


__all__ = ["Scheduler", "SCHEDULERS", "make_scheduler"]
