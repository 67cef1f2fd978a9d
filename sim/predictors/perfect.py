"""Perfect predictor: the upcoming request's true routing shares (an upper bound, and
the test that the eMoE policy then loads exactly the oracle's expert set)."""
from sim.predictors.base import ExpertPredictor, normalise


class PerfectPredictor(ExpertPredictor):
    kind = "perfect"

    def __init__(self, *a, trace=None, **kw):
        super().__init__(*a, **kw)
        self.trace = trace

    def predict(self, task, history, upcoming=None):
        if upcoming is None or not len(upcoming):
            return self.task_prior(task)
        from traces.stats import request_counts, token_mask
        counts = request_counts(self.trace, token_mask(self.trace, "all"))[upcoming].sum(axis=0)
        return normalise(counts)
