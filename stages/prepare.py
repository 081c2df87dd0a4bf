"""DVC stage 'prepare': a thin CLI over catdog.prepare.run (see dvc.yaml)."""

from catdog import prepare
from catdog.stage import main

if __name__ == "__main__":
    main("prepare", prepare.run)
