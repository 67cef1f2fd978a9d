"""Expert-management policies, by name. Add one: subclass ExpertPolicy, register it here
(or leave it in your own module and name it `module:Class`: sim/plugins.py)."""
from sim.policies.base import ExpertPolicy, StepBatch, StepPlan
from sim.policies.emoe import EmoePolicy
from sim.policies.moe_infinity import MoEInfinityPolicy
from sim.policies.mru import MRUPolicy
from sim.policies.on_demand import OnDemandPolicy
from sim.policies.oracle import OraclePolicy
from sim.policies.pregated import PregatedPolicy
from sim.policies.random_subset import RandomPolicy
from sim.policies.resident import ResidentPolicy
from sim.plugins import lookup

POLICIES: dict[str, type[ExpertPolicy]] = {
    p.name: p for p in (ResidentPolicy, OnDemandPolicy, RandomPolicy, PregatedPolicy, MoEInfinityPolicy,
                        OraclePolicy, EmoePolicy, MRUPolicy)
}


def policy_class(name: str, base_dir=None) -> type[ExpertPolicy]:
    """The class a scenario's policy.name stands for: registered, module:Class or installed."""
    return lookup("policy", name, POLICIES, ExpertPolicy, base_dir)


def make_policy(spec: dict, model, trace=None, seed: int = 0, base_dir=None) -> ExpertPolicy:
    params = {k: v for k, v in spec.items() if k != "name"}
    return policy_class(spec["name"], base_dir)(model, params, trace, seed, base_dir)


__all__ = ["ExpertPolicy", "StepBatch", "StepPlan", "POLICIES", "make_policy", "policy_class"]
