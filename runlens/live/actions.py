"""What ``runlens watch`` does with an event besides printing it: run a command, POST it.

Each action runs on its own worker thread fed by a queue, so a slow command or an
unreachable server never delays the watch: :meth:`Action.submit` only enqueues. Commands
get a timeout (then they are killed); webhooks get a timeout per attempt and retries with
exponential backoff. Failures become one warning line each (``on_warning``), never an
exception in the watch. :meth:`Action.close` waits (bounded) for what is queued, so the
event that made the watch exit (``--fail-on``) is still delivered.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

Warn = Callable[[str], None]


class Action:
    """A worker thread running :meth:`handle` on each submitted payload, in order."""

    name = "action"

    def __init__(self, on_warning: Warn | None = None) -> None:
        self.on_warning = on_warning or (lambda _msg: None)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"runlens-{self.name}", daemon=True)
        self._thread.start()
        self.delivered = 0
        self.failed = 0

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue ``payload``; returns at once."""
        self._queue.put(payload)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float) -> bool:
        """Let the queued payloads go out (at most ``timeout`` seconds); True if all did."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            try:
                ok = self.handle(payload)
            except Exception as exc:  # never let the worker die: report and go on
                self.on_warning(f"{self.name} failed: {type(exc).__name__}: {exc}")
                ok = False
            if ok:
                self.delivered += 1
            else:
                self.failed += 1

    def handle(self, payload: dict[str, Any]) -> bool:
        raise NotImplementedError


class ExecAction(Action):
    """Run a shell command with the event as one line of JSON on its stdin."""

    name = "--exec"

    def __init__(self, command: str, timeout: float = 60.0, on_warning: Warn | None = None) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(on_warning)

    def handle(self, payload: dict[str, Any]) -> bool:
        data = (json.dumps(payload) + "\n").encode()
        try:
            proc = subprocess.run(
                self.command,
                shell=True,
                input=data,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.on_warning(f"--exec command timed out after {self.timeout:g} s (killed)")
            return False
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            tail = f": {err[-1][:200]}" if err else ""
            self.on_warning(f"--exec command exited with status {proc.returncode}{tail}")
            return False
        return True


class WebhookAction(Action):
    """POST the event as JSON to a URL: ``timeout`` seconds per attempt, ``retries``
    more attempts after a failure (connection error, timeout, HTTP 5xx or 429), waiting
    ``backoff`` x 2^n seconds before attempt n+1."""

    name = "--webhook"

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 1.0,
        on_warning: Warn | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        super().__init__(on_warning)

    def handle(self, payload: dict[str, Any]) -> bool:
        body = json.dumps(payload).encode()
        why = ""
        tries = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            tries += 1
            req = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "runlens-watch"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read()
                return True
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:  # the server refused: retrying won't help
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                why = str(getattr(exc, "reason", exc)) or type(exc).__name__
        self.on_warning(f"--webhook POST to {self.url} failed after {tries} attempt(s): {why}")
        return False
