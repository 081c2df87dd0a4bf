"""DVC stage 'train': a thin CLI over catdog.pipeline.train.run (see dvc.yaml)."""

from catdog.pipeline.stage import main, stage_imports

if __name__ == "__main__":
    with stage_imports():  # the collector paused while the modules import (catdog.pipeline.stage)
        from catdog.pipeline import train
    main("train", train.run, ends_process=True)
