"""``train.py`` on the toy task for subprocess tests, with fault injection as a callback:

    python tests/toy_train.py [--fault kill:N | --fault term:N] TRAIN_PY_ARGS...

``kill:N`` sends SIGKILL to this process after step N (before that step's checkpoint), ``term:N`` SIGTERM
(preemption: the loop writes a final checkpoint at step N and exits)."""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import tests.toy  # noqa: F401 -- registers the "toy" task
    import train

    on_step = None
    if argv[:1] == ["--fault"]:
        kind, _, at = argv[1].partition(":")
        sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind]

        def on_step(step: int, at: int = int(at), sig=sig) -> None:
            if step == at:
                os.kill(os.getpid(), sig)
        argv = argv[2:]
    return train.main(argv, on_step=on_step)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
