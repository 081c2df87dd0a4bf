"""DVC stage 'train': a thin CLI over catdog.pipeline.train.run (see dvc.yaml)."""

from catdog.pipeline import train
from catdog.pipeline.stage import main

if __name__ == "__main__":
    main("train", train.run, ends_process=True)
