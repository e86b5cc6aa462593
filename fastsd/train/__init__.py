"""Training a small pixel-space diffusion model from fastsd's own UNet (an example of the models in training,
not part of the inference path: nothing under fastsd/ imports this package).

    python -m fastsd.train --dataset digits --conditional --out run/     (trainer.py)
    python -m fastsd.train.sample run/ --class 7 --out grid.png          (sample.py)
    python -m fastsd.train.evaluate run/ --cfg-scale 1 2 3               (evaluate.py)

datasets.py reads the data sets; classcond.py is the class-conditioned UNet wrapper.
"""
