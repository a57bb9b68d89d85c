"""Where an experiment's results go: never over a file that was there before this process first
wrote to that path (a committed result, another run's); those results go to the first free
``<stem>-<n><suffix>`` beside it, said once on stderr. A process's own later writes to the path
(a restartable script rewriting its file row by row) replace its own file."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_WRITTEN: dict[Path, Path] = {}


def own_file(path: str | Path) -> Path:
    """The file this process writes ``path``'s results to."""
    path = Path(path)
    key = path.absolute()
    if key not in _WRITTEN:
        target, n = path, 1
        while True:  # claimed by creating it: two processes starting together never take one name
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                n += 1
                target = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if target != path:
            print(f"{path} holds earlier results, kept: these go to {target} (move it over {path.name} to replace "
                  "them)", file=sys.stderr)
        _WRITTEN[key] = target
    return _WRITTEN[key]


def write_text(path: str | Path, text: str) -> Path:
    """``text`` into :func:`own_file` of ``path`` (a temporary renamed over it); returns that file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = own_file(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target
