"""Perfect predictor: the upcoming requests' true routing shares (an upper bound, and
the test that the eMoE policy then loads exactly the oracle's expert set)."""
from sim.predictors.base import ExpertPredictor, normalise


class PerfectPredictor(ExpertPredictor):
    kind = "perfect"

    def __init__(self, *a, trace=None, **kw):
        super().__init__(*a, **kw)
        self.trace = trace
        self._counts = None     # (R, L, E), computed once: it is asked at every invocation

    def predict(self, task, history, upcoming=None):
        if upcoming is None or not len(upcoming):
            return self.task_prior(task)
        if self._counts is None:
            from traces.stats import request_counts, token_mask
            self._counts = request_counts(self.trace, token_mask(self.trace, "all"))
        return normalise(self._counts[upcoming].sum(axis=0))
