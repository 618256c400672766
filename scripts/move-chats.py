#!/usr/bin/env python3
"""Moves every chat to the instance that owns it now, after instances were added or removed.

    scripts/move-chats.py --via http://127.0.0.1:8080 \
        --instance a=/etc/chatpool/a.toml --instance b=/etc/chatpool/b.toml ...

For each instance (its name as in haproxy.cfg, and the config of that instance, whose database
this script reads and writes with `chatpool export`, `import` and `forget`), it exports every
chat, asks HAProxy (`--via`) which instance owns each one now (the X-Served-By header of a
history request for it), and for each chat whose owner changed: imports it into the owner,
then forgets it on the old instance. Import is idempotent and refuses a chat that diverged;
forget deletes a chat only while it still holds exactly what was exported. So a run that stops
half-way is finished by running it again, and nothing is lost or doubled.

With --copy-only it imports but forgets nothing (the first pass of the two-pass procedure in
docs/scale-out.md). Prints what it moved; exits 1 if anything was refused.
"""

import argparse
import collections
import http.client
import json
import subprocess
import sys
import urllib.parse


def owner(via, chat_id):
    """The instance HAProxy sends this chat's requests to."""
    url = urllib.parse.urlsplit(via)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
    try:
        conn.request("GET", f"/v1/chats/{chat_id}/messages?limit=1")
        response = conn.getresponse()
        response.read()
        served_by = response.getheader("X-Served-By")
        if not served_by:
            sys.exit(f"move-chats: no X-Served-By from {via} (status {response.status}); "
                     "is it HAProxy with deploy/haproxy.cfg?")
        return served_by
    finally:
        conn.close()


def chatpool(binary, config, command, lines=None):
    """Runs `chatpool --config CONFIG COMMAND`, feeding it `lines`; returns its stdout."""
    result = subprocess.run(
        [binary, "--config", config, command],
        input="".join(lines) if lines is not None else None,
        capture_output=True,
        text=True,
    )
    sys.stderr.write(result.stderr)
    return result.returncode, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--via", required=True, help="HAProxy's URL")
    parser.add_argument("--instance", action="append", required=True, metavar="NAME=CONFIG")
    parser.add_argument("--bin", default="chatpool", help="the chatpool binary")
    parser.add_argument("--copy-only", action="store_true", help="import, but forget nothing")
    args = parser.parse_args()
    configs = dict(item.split("=", 1) for item in args.instance)

    failed = False
    moved = collections.Counter()
    for name, config in configs.items():
        code, out = chatpool(args.bin, config, "export")
        if code != 0:
            sys.exit(f"move-chats: export from {name} failed")
        by_owner = collections.defaultdict(list)
        for line in out.splitlines(keepends=True):
            record = json.loads(line)
            new_owner = owner(args.via, record["chat_id"])
            if new_owner != name:
                if new_owner not in configs:
                    sys.exit(f"move-chats: HAProxy names {new_owner!r}, not given as --instance")
                by_owner[new_owner].append(line)
        for new_owner, lines in by_owner.items():
            code, _ = chatpool(args.bin, configs[new_owner], "import", lines)
            if code != 0:
                # Forget only what the new owner holds for certain: nothing, on a failed run.
                failed = True
                continue
            if not args.copy_only:
                code, _ = chatpool(args.bin, config, "forget", lines)
                failed |= code != 0
            moved[(name, new_owner)] += len(lines)
    for (source, target), count in sorted(moved.items()):
        verb = "copied" if args.copy_only else "moved"
        print(f"{verb} {count} chats from {source} to {target}")
    if not moved:
        print("every chat is with its owner")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
