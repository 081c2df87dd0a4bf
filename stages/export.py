"""DVC stage 'export': a thin CLI over catdog.pipeline.export.run (see dvc.yaml)."""

from catdog.pipeline import export
from catdog.pipeline.stage import main

if __name__ == "__main__":
    main("export", export.run, ends_process=True)
