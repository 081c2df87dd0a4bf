"""DVC stage 'audit': a thin CLI over catdog.pipeline.audit.run (see dvc.yaml)."""

from catdog.pipeline import audit
from catdog.pipeline.stage import main

if __name__ == "__main__":
    main("audit", audit.run, ends_process=True)
