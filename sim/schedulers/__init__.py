"""Request schedulers, by name. Add one: subclass Scheduler, register it here
(or leave it in your own module and name it `module:Class`: sim/plugins.py)."""
from sim.schedulers.base import Scheduler
from sim.schedulers.basic import EDF, FCFS, SJF
from sim.schedulers.emoe import EmoeScheduler
from sim.plugins import lookup

SCHEDULERS: dict[str, type[Scheduler]] = {s.name: s for s in (FCFS, SJF, EDF, EmoeScheduler)}


def scheduler_class(name: str, base_dir=None) -> type[Scheduler]:
    """The class a scenario's scheduler.name stands for: registered, module:Class or installed."""
    return lookup("scheduler", name, SCHEDULERS, Scheduler, base_dir)


def make_scheduler(spec: dict, base_dir=None) -> Scheduler:
    return scheduler_class(spec["name"], base_dir)({k: v for k, v in spec.items() if k != "name"})


__all__ = ["Scheduler", "SCHEDULERS", "make_scheduler", "scheduler_class"]
