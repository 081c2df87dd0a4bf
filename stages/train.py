"""DVC stage 'train': a thin CLI over catdog.train.run (see dvc.yaml)."""

from catdog import train
from catdog.stage import main

if __name__ == "__main__":
    main("train", train.run)
