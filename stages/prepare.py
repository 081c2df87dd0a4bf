"""DVC stage 'prepare': a thin CLI over catdog.pipeline.prepare.run (see dvc.yaml)."""

from catdog.pipeline import prepare
from catdog.pipeline.stage import main

if __name__ == "__main__":
    main("prepare", prepare.run, ends_process=True)
