"""Run `streammerge` commands, each in a child process that SIGKILLs itself right after its n-th change to the
file system, so that tests kill a run at an exact instant instead of a racy one.

    python tests/kill_at.py SCENARIOS_JSON

SCENARIOS_JSON is a list of {"args": [...], "after": n, "trace": path}; each runs in turn in a child forked
from this process, which imports torch and transformers once for all of them ({"copy": [source, target]}
copies a directory between them). A change is a rename, unlink,
mkdir or rmdir (every file streammerge writes is renamed into place); after n of them the child SIGKILLs itself
(n = 0: it runs to the end), or with "pause": true it writes its pid to "trace" + ".paused" and waits there
to be killed. "trace", when given, receives each change as it happens, one "operation path" per line.
Prints the children's exit codes (-9 for a kill) as a JSON list.
"""

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from streammerge.cli import main
from streammerge.model import Model

CHANGES = ("replace", "rename", "unlink", "mkdir", "rmdir")


def child(args: list[str], after: int, trace: str | None, pause: bool) -> None:
    lock, count = threading.Lock(), [0]
    log = open(trace, "w") if trace else None

    def counted(name, real):
        def change(*a, **k):
            result = real(*a, **k)
            with lock:
                count[0] += 1
                if log:
                    log.write(f"{name} {' '.join(map(str, a))}\n")
                    log.flush()
                if count[0] == after:
                    if pause:
                        with open(f"{trace}.paused", "w") as f:
                            f.write(str(os.getpid()))
                        while True:
                            time.sleep(1)
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        return change

    for name in CHANGES:
        setattr(os, name, counted(name, getattr(os, name)))
    try:
        main(args, prog_name="streammerge")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(scenarios: list[dict]) -> list[int]:
    model_dirs = {s["args"][1] for s in scenarios if s.get("args", [None])[0] == "run"}
    for model_dir in model_dirs:  # transformers imports a family's classes on first use: once, not per child
        Model.open(Path(model_dir)).tokenizer()
    codes = []
    for scenario in scenarios:
        if "copy" in scenario:
            shutil.copytree(*scenario["copy"])
            codes.append(0)
            continue
        pid = os.fork()
        if pid == 0:
            child(scenario["args"], scenario.get("after", 0), scenario.get("trace"), scenario.get("pause", False))
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
