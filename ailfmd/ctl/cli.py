"""``ailfmctl``: ask ailfmd what it sees and what it is doing."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Sequence

from ailfmd.ctl.sensors_report import build_report, render_text
from ailfmd.errors import AilfmError


def _cmd_sensors(args: argparse.Namespace) -> int:
    from ailfmd.platform.linux.platform import LinuxPlatform

    # Reading needs no run dir; a private temporary one keeps a read-only command from
    # creating /run/ailfmd.
    with tempfile.TemporaryDirectory(prefix="ailfmctl-") as run_dir:
        plat = LinuxPlatform(
            sysfs_root=args.sysfs_root, procfs_root=args.procfs_root, run_dir=run_dir, use_perf=not args.no_perf
        )
        try:
            rep = build_report(
                plat.topology(),
                plat.capabilities(),
                plat.observe(),
                {"sysfs": str(args.sysfs_root), "procfs": str(args.procfs_root)},
            )
        finally:
            plat.close()
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ailfmctl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sensors", help="topology, temperatures, frequency policies and capabilities of this box")
    s.add_argument("--sysfs-root", default="/sys", help="sysfs to read (default /sys; a fixture tree for tests)")
    s.add_argument("--procfs-root", default="/proc", help="procfs to read (default /proc)")
    s.add_argument("--json", action="store_true", help="machine-readable output (docs/sensors-json.md)")
    s.add_argument("--no-perf", action="store_true", help="do not probe perf_event_open")
    s.set_defaults(func=_cmd_sensors)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AilfmError as e:
        print(f"ailfmctl: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
