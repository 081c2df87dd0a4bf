"""DVC stage 'export': a thin CLI over catdog.pipeline.export.run (see dvc.yaml)."""

from catdog.pipeline.stage import main, stage_imports

if __name__ == "__main__":
    with stage_imports():  # the collector paused while the modules import (catdog.pipeline.stage)
        from catdog.pipeline import export
    main("export", export.run, ends_process=True)
