"""``ailfmctl``: ask ailfmd what it sees and what it is doing.

Exit codes: 0 success, 1 error (the daemon refused or failed, bad input), 2 usage,
3 ailfmd is not running, 4 permission denied.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any, Callable, Sequence

from ailfmd.ctl import render
from ailfmd.ctl.client import DEFAULT_SOCKET, DaemonNotRunning, PermissionDenied, request
from ailfmd.ctl.sensors_report import build_report, render_text
from ailfmd.errors import AilfmError

EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4


def _emit(doc: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> int:
    if as_json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human(doc))
    return 0


def _cmd_sensors(args: argparse.Namespace) -> int:
    if args.socket is not None:
        if args.sysfs_root is not None or args.procfs_root is not None:
            raise AilfmError("--socket asks the daemon; it cannot be combined with --sysfs-root/--procfs-root")
        return _emit(request(args.socket, "sensors", timeout_s=args.timeout), args.json, render_text)

    from ailfmd.platform.linux.platform import LinuxPlatform

    sysfs_root = args.sysfs_root or "/sys"
    procfs_root = args.procfs_root or "/proc"
    # Reading needs no run dir; a private temporary one keeps a read-only command from
    # creating /run/ailfmd.
    with tempfile.TemporaryDirectory(prefix="ailfmctl-") as run_dir:
        plat = LinuxPlatform(sysfs_root=sysfs_root, procfs_root=procfs_root, run_dir=run_dir, use_perf=not args.no_perf)
        try:
            rep = build_report(
                plat.topology(),
                plat.capabilities(),
                plat.observe(),
                {"sysfs": str(sysfs_root), "procfs": str(procfs_root)},
            )
        finally:
            plat.close()
    return _emit(rep, args.json, render_text)


def _cmd_status(args: argparse.Namespace) -> int:
    color = render.use_color(sys.stdout)
    return _emit(request(args.socket, "status", timeout_s=args.timeout), args.json, lambda d: render.render_status(d, color))


def _cmd_policy(args: argparse.Namespace) -> int:
    return _emit(request(args.socket, "policy", timeout_s=args.timeout), args.json, render.render_policy)


def _cmd_explain(args: argparse.Namespace) -> int:
    doc = request(args.socket, "explain", {"epochs": args.epochs}, timeout_s=args.timeout)
    return _emit(doc, args.json, render.render_explain)


def _mode_cmd(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _emit(request(args.socket, name, timeout_s=args.timeout), args.json, render.render_mode)

    return run


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _daemon_options(
    p: argparse.ArgumentParser, socket_default: str | None = DEFAULT_SOCKET, json_doc: str = "docs/control-protocol.md"
) -> None:
    p.add_argument(
        "--socket",
        default=socket_default,
        metavar="PATH",
        help=f"ailfmd's control socket (default {DEFAULT_SOCKET})" if socket_default else
        f"ask the daemon at this control socket (e.g. {DEFAULT_SOCKET}) instead of reading the machine",
    )
    p.add_argument("--json", action="store_true", help=f"machine-readable output ({json_doc})")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for ailfmd (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ailfmctl",
        description="Ask ailfmd what it sees and what it is doing.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 ailfmd not running, 4 permission denied",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sensors", help="topology, temperatures, frequency policies and capabilities of this box")
    s.add_argument("--sysfs-root", default=None, help="sysfs to read (default /sys; a fixture tree for tests)")
    s.add_argument("--procfs-root", default=None, help="procfs to read (default /proc)")
    s.add_argument("--no-perf", action="store_true", help="do not probe perf_event_open")
    # Without --socket, sensors reads the machine itself: it must work with no daemon.
    _daemon_options(s, socket_default=None, json_doc="docs/sensors-json.md")
    s.set_defaults(func=_cmd_sensors)

    s = sub.add_parser("status", help="mode, policy, per-CPU temperatures (heat map), threads, shield")
    _daemon_options(s)
    s.set_defaults(func=_cmd_status)

    s = sub.add_parser("policy", help="the configured policy, the one deciding now, fallbacks")
    _daemon_options(s)
    s.set_defaults(func=_cmd_policy)

    s = sub.add_parser("explain", help="every action of the last epochs and why it was taken")
    s.add_argument("-n", "--epochs", type=_positive_int, default=10, help="how many epochs back (default 10)")
    _daemon_options(s)
    s.set_defaults(func=_cmd_explain)

    for name, text in (
        ("pause", "stop applying actions (keep observing); root only"),
        ("resume", "apply actions again; root only"),
        ("reload", "reload config and policy without dropping protection; root only"),
    ):
        s = sub.add_parser(name, help=text)
        _daemon_options(s)
        s.set_defaults(func=_mode_cmd(name))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DaemonNotRunning as e:
        print(f"ailfmctl: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionDenied as e:
        print(f"ailfmctl: {e}", file=sys.stderr)
        return EXIT_PERMISSION
    except AilfmError as e:
        print(f"ailfmctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
