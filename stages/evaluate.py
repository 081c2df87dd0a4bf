"""DVC stage 'evaluate': a thin CLI over catdog.pipeline.evaluate.run (see dvc.yaml)."""

from catdog.pipeline import evaluate
from catdog.pipeline.stage import main

if __name__ == "__main__":
    main("evaluate", evaluate.run, ends_process=True)
