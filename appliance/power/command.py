"""`appliance power EVENT` and `appliance power wait-clean --timeout S`.

upsmon runs NOTIFYCMD with the message as its argument and the event in the
environment (NOTIFYTYPE, UPSNAME), so an argument that is not an event name
is taken as the message and the event comes from NOTIFYTYPE.
"""

from __future__ import annotations

import os
import sys

from .state import EVENTS, PUSH


def power_command(args, ask) -> int:
    """`ask(cmd, **kw)` sends a control request and returns the answer."""
    words = list(args.words)
    if words and words[0] == "wait-clean":
        answer = ask("power-wait-clean", seconds=args.timeout)
        if answer.get("clean"):
            print(f"clean: {answer.get('rambacks', 0)} ramback(s) drained and their backing flushed")
            return 0
        print(f"not clean after {args.timeout:g} s: {answer.get('dirty_bytes', 0)} bytes still dirty", file=sys.stderr)
        return 1
    if words and words[0].upper() in PUSH:
        event, message = words[0].upper(), " ".join(words[1:])
    elif os.environ.get("NOTIFYTYPE"):
        event, message = os.environ["NOTIFYTYPE"].upper(), " ".join(words)
    else:
        print(f"appliance power: give an event ({', '.join(EVENTS)}) or wait-clean, "
              "or set NOTIFYTYPE as upsmon does", file=sys.stderr)
        return 2
    answer = ask("power", event=event, ups=args.ups or os.environ.get("UPSNAME"), message=message)
    if answer.get("ignored"):
        print(f"{event}: ignored: {answer['ignored']}")
    else:
        print(f"{event}: power {answer['state']}, rambacks {answer['mode']} ({answer['reason']})")
    return 0
