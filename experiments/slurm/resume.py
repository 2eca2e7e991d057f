"""Print the checkpoint a (re)started stage-3 job resumes from, or nothing for a fresh start.

Candidates under the run's ``default_root_dir``: Lightning's ``hpc_ckpt_<n>.ckpt`` (written when SLURM's
requeue signal arrives, just before the job is requeued) and every ``last*.ckpt`` in a ``checkpoints`` folder
(``ModelCheckpoint``'s latest weights; each restart logs to a new version folder, so earlier versions count
too). The newest by modification time wins. Files and DeepSpeed's checkpoint folders both qualify.

    python experiments/slurm/resume.py runs/games/llm     # -> runs/games/llm/hpc_ckpt_1.ckpt, or ""
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")
_HPC = re.compile(r"^hpc_ckpt_\d+\.ckpt$")


def resume_checkpoint(root: str | Path) -> Path | None:
    """The newest resumable checkpoint under ``root`` (None when there is none or ``root`` does not exist).

    Args:
        root: the run's ``trainer.default_root_dir``.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [path for path in root.iterdir() if _HPC.match(path.name)]
    candidates += [
        path for path in root.rglob("last*.ckpt") if _LAST.match(path.name) and path.parent.name == "checkpoints"
    ]
    return max(candidates, key=lambda path: (path.stat().st_mtime_ns, str(path)), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the run's trainer.default_root_dir")
    found = resume_checkpoint(parser.parse_args().root)
    print(found if found is not None else "")


if __name__ == "__main__":
    main()
