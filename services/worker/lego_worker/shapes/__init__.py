"""`lego-shapes`: a tiny SD 1.5-architecture text-to-image model trained on synthetic captioned
shapes (issue #12), so the CPU demo draws what the prompt says. `model` builds the preset from the
committed weights; `dataset`, `train`, `fidelity` and `grid` make, train, score and show it."""
