"""DVC stage 'evaluate': a thin CLI over catdog.evaluate.run (see dvc.yaml)."""

from catdog import evaluate
from catdog.stage import main

if __name__ == "__main__":
    main("evaluate", evaluate.run)
