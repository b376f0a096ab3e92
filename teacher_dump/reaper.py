"""A watchdog for the local Ray cluster a dump starts.

Ray ties its head processes to the driver, but a SIGKILLed driver leaves `ray::DashboardAgent` and
`ray::RuntimeEnvAgent` running forever (reparented to init). The driver starts this process with a
pipe and tells it the cluster's process ids as they appear; when the pipe closes (the driver ended,
however it ended) the watchdog kills those still alive. A process id is only trusted together with
its start time, so a reused id is never killed.

    python -m teacher_dump.reaper      # reads "PID START_TIME" lines on stdin until EOF
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


class Reaper:
    """The driver's end: `watch()` the driver's descendants whenever new ones may have started."""

    def __init__(self) -> None:
        # Children the driver had before the cluster (a caller's DataLoader workers, its own
        # subprocesses) are not the cluster's: never handed to the watchdog.
        self.seen: set[int] = {c.pid for c in psutil.Process().children(recursive=True)}
        self.proc = subprocess.Popen([sys.executable, "-m", "teacher_dump.reaper"], stdin=subprocess.PIPE,
                                     text=True, start_new_session=True)

    def watch(self) -> None:
        for child in psutil.Process().children(recursive=True):
            if child.pid in self.seen or child.pid == self.proc.pid:
                continue
            try:
                self.proc.stdin.write(f"{child.pid} {child.create_time()}\n")
            except psutil.NoSuchProcess:
                continue
            self.seen.add(child.pid)
        self.proc.stdin.flush()

    def close(self) -> None:
        """A clean end: the watchdog still removes what Ray's shutdown left behind."""
        self.proc.stdin.close()


def main() -> None:
    watched = []
    for line in sys.stdin:  # until EOF: the driver is gone
        try:
            pid, started = line.split()
            watched.append((int(pid), float(started)))
        except ValueError:  # one malformed line (a write cut by the kill) must not spare the rest
            print(f"lmod reaper: ignoring malformed line {line.strip()!r}", file=sys.stderr)
    time.sleep(1.0)  # a clean ray.shutdown() is already done; give stragglers a moment
    for pid, started in watched:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 1e-3:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


if __name__ == "__main__":
    main()
