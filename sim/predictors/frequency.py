"""Frequency baseline: each task's mean routing shares in training, per layer."""
from sim.predictors.base import ExpertPredictor


class FrequencyPredictor(ExpertPredictor):
    kind = "frequency"

    def predict(self, task, history, upcoming=None):
        return self.task_prior(task)
