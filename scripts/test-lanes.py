#!/usr/bin/env python3
"""Runs the workspace's test binaries in two lanes side by side, then the ones that must run alone.

`cargo test` runs one test binary after another, and most of the suite's binaries spend their
time waiting (an organism healing, a replicated database failing over, a rolling upgrade): on two
cores the machine sat about four fifths idle through the run. This runs the binaries `cargo test
--workspace --no-run --message-format=json-render-diagnostics` built (its JSON lines on standard
input) the way cargo would (working directory the package's, `CARGO_MANIFEST_DIR` set), each
binary still running its own tests in parallel, in

  * lane one: every binary not named below (a new test file lands here by default);
  * lane two, beside lane one: `SECOND`, the long binaries that mostly wait;
  * then alone, one after another: `ALONE`, the binaries that restart the machine's PostgreSQL
    or RabbitMQ (every other lane's organisms use them), and those that check politeness by the
    time between requests as the test's web server saw them (a loaded machine delays a request
    on its way by more than their tolerance).

Each binary's output is printed whole when it ends, under a header naming it. Every binary runs
even after one fails; the exit status is 1 if any failed or ran past `TIMEOUT` (its process group
is then stopped: the test binaries' cells die with them).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

# (package, target): binaries that restart the machine's PostgreSQL or RabbitMQ, or measure the
# time between requests at the test's web server.
ALONE = [
    ("cell", "cluster_loop"),
    ("engines", "postgres"),
    ("engines", "rabbitmq"),
    ("cell", "politeness"),
    ("cell", "homeostasis"),
]
# (package, target): long binaries, mostly waiting, run beside the rest.
SECOND = [("cell", "stable_storage"), ("cell", "upgrade")]
# A binary running longer than this has hung.
TIMEOUT = 20 * 60

print_lock = threading.Lock()
failed = []
# Process groups of the binaries running now, stopped if this script is interrupted.
running = set()
stopping = threading.Event()


def interrupted(signum, _frame):
    stopping.set()
    for proc in list(running):
        stop_group(proc)
    sys.exit(128 + signum)


def binaries(lines):
    found = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        target = msg["target"]
        package = os.path.basename(os.path.dirname(msg["manifest_path"]))
        found.append(
            {
                "package": package,
                "target": target["name"],
                "kind": target["kind"][0],
                "executable": msg["executable"],
                "manifest_dir": os.path.dirname(msg["manifest_path"]),
            }
        )
    return found


def name(b):
    return "{}/{} ({})".format(b["package"], b["target"], b["kind"])


def stop_group(proc):
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(b):
    env = dict(os.environ, CARGO_MANIFEST_DIR=b["manifest_dir"])
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            [b["executable"]],
            cwd=b["manifest_dir"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running.add(proc)
        try:
            code = proc.wait(TIMEOUT)
            verdict = "ok" if code == 0 else "FAILED (exit status {})".format(code)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            code = None
            verdict = "FAILED (still running after {} s; stopped)".format(TIMEOUT)
        running.discard(proc)
        secs = time.monotonic() - started
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    with print_lock:
        print("\n===== {}: {} in {:.0f} s".format(name(b), verdict, secs), flush=True)
        sys.stdout.write(text)
        sys.stdout.flush()
        if code != 0:
            failed.append(name(b))


def lane(items):
    for b in items:
        if stopping.is_set():
            return
        run(b)


def main():
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    found = binaries(sys.stdin)
    if not found:
        print("test-lanes: no test binaries on standard input", file=sys.stderr)
        return 1
    key = lambda b: (b["package"], b["target"])
    known = {key(b) for b in found}
    for wanted in ALONE + SECOND:
        if wanted not in known:
            print("test-lanes: no test binary {}/{}".format(*wanted), file=sys.stderr)
            return 1
    alone = [b for b in found if key(b) in ALONE]
    second = [b for b in found if key(b) in SECOND]
    first = [b for b in found if key(b) not in ALONE and key(b) not in SECOND]

    started = time.monotonic()
    other = threading.Thread(target=lane, args=(second,), daemon=True)
    other.start()
    lane(first)
    other.join()
    lane(alone)
    print(
        "\n===== {} test binaries in {:.0f} s; {}".format(
            len(found),
            time.monotonic() - started,
            "failed: " + ", ".join(failed) if failed else "all passed",
        ),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
