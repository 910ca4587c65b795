"""A real, private Postfix instance relaying one domain to a local port, for tests.

This module's single job is to stand in for the organisation's MTA of
``deploy/postfix/``: Postfix accepts mail for ``reply_domain`` on a loopback port
of its own and relays it over SMTP to ``127.0.0.1:<target_port>`` (the daemon's
listener, or a sink), refusing every other domain like any MTA that is not an
open relay::

    with PostfixRelay(reply_domain="reply.example.com", target_port=sink_port) as relay:
        send to 127.0.0.1:relay.port ...
        print(relay.log())

It runs the distribution's Postfix (Debian: ``apt-get install -y postfix``) as
root, because Postfix's master must start as root and hand work to the
``postfix`` user. Everything it writes stays in a private directory: its own
``config_directory``, ``queue_directory``, ``data_directory`` and
``maillog_file``. It is started with ``postfix -c DIR start`` and stopped with
``postfix -c DIR stop``, so the system instance in /etc/postfix is never read for
its settings, started or stopped, and nothing is sent to syslog or DNS.

The directory is a short ``/tmp/hitl-pf-XXXXXXXX``, not pytest's ``tmp_path``:
Postfix talks to its log daemon through ``$queue_directory/public/postlog``, an
AF_UNIX socket whose absolute path must fit in 108 bytes, and pytest's paths
(named after the test) do not; they also sit under a mode-0700 directory the
``postfix`` user cannot enter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

__all__ = ["PostfixRelay", "skip_reason"]

_SBIN = "/usr/sbin:/usr/local/sbin:/sbin"
COMMAND_TIMEOUT = 30.0
START_ATTEMPTS = 3

# Every service Postfix needs to receive over SMTP and relay over SMTP, nothing else:
# no local delivery, no pickup of the system's maildrop, no TLS cache. chroot is
# off ("n") because the private queue has no chroot tree.
_MASTER_CF = """\
{listen} inet n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _find(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=_SBIN)


def skip_reason() -> str | None:
    """Why a PostfixRelay cannot run here, or ``None`` when it can."""
    if _find("postfix") is None or _find("postmap") is None:
        return (
            "Postfix is not installed (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
        )
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PostfixRelay:
    """Postfix on ``127.0.0.1:<port>`` relaying ``reply_domain`` to ``target_port``.

    ``settings`` adds or overrides ``main.cf`` parameters, e.g.
    ``{"smtpd_recipient_restrictions": "reject_unverified_recipient"}``; a value may
    name this instance's directory as ``$config_directory`` (Postfix expands it).
    ``files`` are written there by name; each is ``postmap``-ed unless it is a
    ``.regexp`` or ``.pcre`` table, as an operator would.
    """

    def __init__(
        self,
        *,
        reply_domain: str,
        target_port: int,
        target_host: str = "127.0.0.1",
        settings: Mapping[str, str] | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        self.reply_domain = reply_domain
        self.target = f"[{target_host}]:{target_port}"
        self.settings = dict(settings or {})
        self.files = dict(files or {})
        self.port = 0
        self.directory: Path | None = None
        self._master_pid: int | None = None

    # -- public ----------------------------------------------------------------------

    def __enter__(self) -> PostfixRelay:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the private configuration and start Postfix; return once it listens."""
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.directory = Path(tempfile.mkdtemp(prefix="hitl-pf-", dir="/tmp"))
        self.directory.chmod(0o755)  # the postfix user walks into it
        try:
            self._start_master()
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop this instance (never another), then remove its directory."""
        if self.directory is None:
            return
        try:
            if self._master_pid is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._postfix("stop")
                self._kill_if_still_running(self._master_pid)
        finally:
            self._master_pid = None
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def log(self) -> str:
        """Everything this instance logged so far (its ``maillog_file``)."""
        if self.directory is None:
            return ""
        try:
            return (self.directory / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Poll the log until it contains ``text``; the log, or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{log}")
            time.sleep(0.1)

    # -- internals -------------------------------------------------------------------

    @property
    def _config_directory(self) -> Path:
        assert self.directory is not None
        return self.directory / "conf"

    def _main_cf(self) -> dict[str, str]:
        assert self.directory is not None
        base = self.directory
        return {
            "compatibility_level": "3.6",
            "config_directory": str(base / "conf"),
            "queue_directory": str(base / "queue"),
            "data_directory": str(base / "data"),
            # Logs go to a file through postlogd (Postfix >= 3.4), not to syslog.
            "maillog_file": str(base / "maillog"),
            "maillog_file_prefixes": str(base),
            "myhostname": "relay.hitl-mail.test",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            # Deliver nothing locally: this MTA only relays the reply domain.
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": self.reply_domain,
            "transport_maps": f"hash:{base / 'conf' / 'transport'}",
            # The test client connects from 127.0.0.1 but plays the internet, so
            # mynetworks earns no relay permission here (deploy/postfix permits it).
            "smtpd_relay_restrictions": "reject_unauth_destination",
            # No DNS at all: the next hop is a bracketed IP address.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # Retry quickly should the target be briefly away.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "biff": "no",
            **self.settings,
        }

    def _write_config(self) -> None:
        assert self.directory is not None
        conf = self._config_directory
        conf.mkdir(exist_ok=True)
        (self.directory / "queue").mkdir(exist_ok=True)
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, user="postfix")
        main_cf = "".join(f"{key} = {value}\n" for key, value in self._main_cf().items())
        (conf / "main.cf").write_text(main_cf)
        (conf / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        files = {**self.files, "transport": f"{self.reply_domain}  smtp:{self.target}\n"}
        for name, text in files.items():
            (conf / name).write_text(text)
            if not name.endswith((".regexp", ".pcre")):
                self._postmap(conf / name)

    def _postmap(self, table: Path) -> None:
        postmap = _find("postmap")
        assert postmap is not None
        subprocess.run(
            [postmap, "-c", str(self._config_directory), str(table)],
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            env=self._environment(),
        )

    def _environment(self) -> dict[str, str]:
        # MAIL_CONFIG too, so every helper Postfix runs reads our main.cf.
        return {**os.environ, "MAIL_CONFIG": str(self._config_directory)}

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        postfix = _find("postfix")
        assert postfix is not None
        # `postfix stop` waits up to 5 s, then kills its own process group.
        return subprocess.run(
            [postfix, "-c", str(self._config_directory), command],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            env=self._environment(),
            check=False,
        )

    def _start_master(self) -> None:
        error = ""
        for _ in range(START_ATTEMPTS):  # the free port may be taken before master binds it
            self.port = free_port()
            self._write_config()
            result = self._postfix("start")
            self._master_pid = self._read_master_pid()
            if result.returncode == 0 and self._master_pid is not None:
                return
            error = result.stdout + result.stderr
        raise RuntimeError(f"postfix did not start:\n{error}\n{self.log()}")

    def _read_master_pid(self) -> int | None:
        assert self.directory is not None
        try:
            return int((self.directory / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postfix not listening:\n{self.log()}") from None
                time.sleep(0.1)

    def _kill_if_still_running(self, pid: int) -> None:
        """Last resort after ``postfix stop``: SIGKILL this master's process group."""
        deadline = time.monotonic() + 10
        while _running(pid):
            if time.monotonic() > deadline:
                # master calls setsid(): it leads a group holding only its own children.
                # Checked again so a recycled PID is never killed.
                if os.getpgid(pid) == pid and _is_master(pid):
                    os.killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.1)


def _is_master(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "master"
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent (PID 1 here) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
