"""The built-in digits model is a real model: its samples are recognisable digits of the requested class."""

import numpy as np
import pytest

from ditrt.runtime import Pipeline

PER_CLASS = 20
CLASSES = range(10)


def generate(pipe, label):
    r = pipe(
        class_label=label, seed=10_000 + 100 * label, batch_size=PER_CLASS
    )  # the model's default steps/cfg
    return np.stack(r.images).astype(np.float32).reshape(PER_CLASS, -1) / 127.5 - 1


@pytest.mark.slow
def test_samples_are_the_requested_digit(digits_engine, digit_classifier):
    pipe = Pipeline.load(digits_engine)
    per_class, spreads = {}, {}
    for label in CLASSES:
        x = generate(pipe, label)
        per_class[label] = float(np.mean(digit_classifier.predict(x) == label))
        spreads[label] = float(np.mean(np.abs(x[:, None] - x[None]).mean(-1)))
    overall = float(np.mean(list(per_class.values())))
    print("accuracy per class:", {k: round(v, 2) for k, v in per_class.items()}, "overall", round(overall, 3))
    assert overall >= 0.95, per_class
    assert min(per_class.values()) >= 0.85, per_class
    # samples of one class differ from each other (no collapse onto one template)
    assert min(spreads.values()) > 0.05, spreads
