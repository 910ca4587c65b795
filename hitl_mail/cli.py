"""The `hitl-mail` command line: serve, check-config, requests, webhooks, demo, health.

Exit codes: 0 success, 2 bad usage or configuration (or a port that cannot be
bound), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early_signals: list[int] = []  # received by `serve` before its event loop handles them


def _record_early_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def _serve_started_from_the_command_line() -> bool:
    import multiprocessing

    # Not when a child process of the daemon re-imports this module as its parent's
    # __main__ (multiprocessing's "inheriting" phase): the child sets its own handlers.
    inheriting = getattr(multiprocessing.current_process(), "_inheriting", False)
    return sys.argv[1:2] == ["serve"] and not inheriting


# `serve` must exit 0 on SIGTERM or SIGINT at any moment, and importing the rest of
# the daemon takes half a second during which Python's default action would kill it:
# from here on a stop (or SIGHUP) is recorded, and `serve` acts on it once it can.
if _serve_started_from_the_command_line():
    for _sig in (*STOP_SIGNALS, signal.SIGHUP):
        signal.signal(_sig, _record_early_signal)

from hitl_mail.config import Config, ConfigError, config_path, load_config  # noqa: E402
from hitl_mail.store import NotFound, Store  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("hitl_mail")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"configuration error in {config_path(args.config)}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"no request with id {exc.args[0]!r}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hitl-mail", description="Email-first human-in-the-loop daemon for crewAI Flows."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="configuration file (default: $HITL_MAIL_CONFIG, else ./hitl-mail.toml)"
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "serve", parents=[common], help="run the daemon until SIGTERM/SIGINT"
    ).set_defaults(handler=cmd_serve)
    sub.add_parser(
        "check-config", parents=[common], help="validate the configuration file"
    ).set_defaults(handler=cmd_check_config)
    demo = sub.add_parser("demo", help="a self-contained first run: pause, email, reply, resume")
    demo.add_argument("--config", help=argparse.SUPPRESS)
    demo.set_defaults(handler=cmd_demo)
    health = sub.add_parser(
        "health", parents=[common], help="probe the running daemon's /readyz (exit 0 when ready)"
    )
    health.set_defaults(handler=cmd_health)
    requests = sub.add_parser("requests", help="inspect and act on feedback requests")
    rsub = requests.add_subparsers(dest="action")
    listing = rsub.add_parser("list", parents=[common], help="list requests, newest first")
    listing.add_argument("--status", help="only requests with this status")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(handler=cmd_list)
    show = rsub.add_parser("show", parents=[common], help="one request with its audit trail")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=cmd_show)
    retry = rsub.add_parser("retry", parents=[common], help="resume a resume_failed request again")
    retry.add_argument("id")
    retry.set_defaults(handler=cmd_retry)
    cancel = rsub.add_parser(
        "cancel", parents=[common], help="cancel a pending request; its link stops working"
    )
    cancel.add_argument("id")
    cancel.set_defaults(handler=cmd_cancel)
    webhooks = sub.add_parser("webhooks", help="try the configured webhooks")
    wsub = webhooks.add_subparsers(dest="action")
    test = wsub.add_parser(
        "test", parents=[common], help="POST a signed sample new_request event to one webhook"
    )
    test.add_argument("name", help="the webhook's name in [[webhooks]]")
    test.set_defaults(handler=cmd_webhooks_test)
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _store(config: Config) -> Store:
    store = Store(config.daemon.database_url)
    store.migrate()
    return store


# -- serve ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from hitl_mail import logs

    config = _config(args)
    logs.setup(config.logging)
    return asyncio.run(serve(config, args.config))


async def serve(config: Config, config_arg: str | None) -> int:
    from hitl_mail import systemd
    from hitl_mail.app import App

    app = App(config)
    # Signals first, before anything starts: a stop during start-up ends the start-up
    # (what was started is shut down) and `serve` exits 0; a reload waits for ready.
    loop = asyncio.get_running_loop()
    reloads: list[int] = [s for s in _early_signals if s == signal.SIGHUP]

    def hangup() -> None:
        if app.ready:
            _reload(app, config_arg, systemd)
        else:
            reloads.append(signal.SIGHUP)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, app.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    if any(s in STOP_SIGNALS for s in _early_signals):
        app.stopping.set()
    try:
        await app.startup()  # returns early, not ready, when a stop arrives meanwhile
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await app.shutdown()
        return EXIT_USAGE
    if app.ready:
        systemd.ready()  # only now: a reload or stop signal right after READY=1 is handled
        if reloads:
            _reload(app, config_arg, systemd)
    await app.stopping.wait()
    await app.shutdown()
    return EXIT_ERROR if app.failed else EXIT_OK


def _reload(app: Any, config_arg: str | None, systemd: Any) -> None:
    systemd.reloading()
    try:
        app.reload(load_config(config_path(config_arg)))
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", "; ".join(exc.problems))
    systemd.ready()


# -- check-config -------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    config = load_config(path)
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    print(f"{path}: OK")
    return EXIT_OK


def _cross_checks(config: Config) -> list[str]:
    """What validation of single keys cannot see, including what the stored requests tell."""
    problems = []
    if config.routing.default_assignee is None and not config.routing.rules:
        problems.append(
            "routing: no rules and no default_assignee; every request would be unroutable"
        )
    problems.extend(_auto_outcomes_against_pending(config))
    return problems


def _auto_outcomes_against_pending(config: Config) -> list[str]:
    """An auto-response outcome that a pending request could not take is known only from its `emit`."""
    from hitl_mail.deadlines import effective_policy
    from hitl_mail.models import RequestStatus

    try:
        pending = _store(config).requests(RequestStatus.PENDING)
    except Exception as exc:  # no database yet, or unreachable: nothing stored to check against
        log.debug("check-config: stored requests not checked: %s", exc)
        return []
    problems = []
    for request in pending:
        policy = effective_policy(
            config, request.routing_rule, request.method_name, request.flow_class
        )
        outcome = policy["default_outcome"]
        if policy["enabled"] and request.emit and outcome not in request.emit:
            problems.append(
                f"auto_response.default_outcome: {outcome!r} would apply to pending request {request.id} "
                f"({request.flow_class}.{request.method_name}), whose outcomes are {request.emit}"
            )
    return problems


# -- requests --------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from hitl_mail.views import as_json, table

    rows = _store(_config(args)).requests(args.status)
    if args.json:
        print(json.dumps([as_json(row) for row in rows], indent=2))
    else:
        print(table(rows))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from hitl_mail.views import as_json, describe

    store = _store(_config(args))
    request = store.get(args.id)
    trail = store.trail(request.id)
    if args.json:
        print(json.dumps(as_json(request, trail), indent=2))
    else:
        print(describe(request, trail))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from hitl_mail.actions import retry_resume

    store = _store(_config(args))
    request = store.get(args.id)
    if not retry_resume(store, request.id, actor="cli"):
        print(
            f"request {request.id} is {request.status}, not resume_failed; nothing to retry",
            file=sys.stderr,
        )
        return EXIT_ERROR
    print(f"request {request.id} queued for another resume")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from hitl_mail.actions import cancel_request

    config = _config(args)
    store = _store(config)
    if not cancel_request(config, store, args.id, actor="cli"):
        print(
            f"request {args.id} is {store.get(args.id).status}, not pending; nothing to cancel",
            file=sys.stderr,
        )
        return EXIT_ERROR
    print(f"request {args.id} cancelled; the assignee will be told")
    return EXIT_OK


# -- webhooks --------------------------------------------------------------------------


def cmd_webhooks_test(args: argparse.Namespace) -> int:
    """Exit 0 when the webhook answered 2xx, 1 otherwise, 2 when no webhook has that name."""
    from hitl_mail.delivery import send_test

    config = _config(args)
    webhook = next((hook for hook in config.webhooks if hook.name == args.name), None)
    if webhook is None:
        names = ", ".join(hook.name for hook in config.webhooks) or "none configured"
        print(f"no webhook named {args.name!r} (webhooks: {names})", file=sys.stderr)
        return EXIT_USAGE
    answer = asyncio.run(send_test(webhook))
    print(f"{webhook.name} ({webhook.url}): {answer.describe()}")
    if answer.status is not None and answer.text:
        print(answer.text[:500])
    return EXIT_OK if answer.delivered else EXIT_ERROR


# -- demo and health ----------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from hitl_mail.demo import run_demo

    return run_demo()


def cmd_health(args: argparse.Namespace) -> int:
    from hitl_mail.metrics import probe

    config = _config(args)
    # [health] first: the loopback probe port; else the [http] server, which serves it too.
    served = config.health if config.health.enabled else config.http
    if not served.enabled:
        print("neither [health] nor [http] is enabled in the configuration", file=sys.stderr)
        return EXIT_USAGE
    url = f"http://{served.host}:{served.port}/readyz"
    ready = probe(url, timeout=5.0)
    print("ready" if ready else "not ready")
    return EXIT_OK if ready else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
