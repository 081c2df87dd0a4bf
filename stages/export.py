"""DVC stage 'export': a thin CLI over catdog.export.run (see dvc.yaml)."""

from catdog import export
from catdog.stage import main

if __name__ == "__main__":
    main("export", export.run)
