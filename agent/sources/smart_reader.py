"""The SMART reader child: `python -m agent.sources.smart_reader`, started by the smart source.

Request on stdin, one JSON object:
    {"smartctl": path, "timeout": seconds per device, "ts_ms": sample timestamp,
     "output": "json" | "text" (absent: "text"),
     "devices": [[name, type], ...] (empty: scan), "skip": [[name, type], ...]}
Replies on stdout, one JSON object per line:
    {"devices": [[name, type], ...]}   the devices it is about to read, once
    {"reading": [name, type]}          before each device
    {"read": {...}}                    that device's samples or error (smart.read_to_json)
Anything else it prints (a warning, a traceback) is reported by the agent as the reader's
own words. pySMART is imported here for "text", never in the agent (see agent/sources/smart.py);
"json" reads smartctl's own JSON and does not import it (its ~3.5 MB stay out of the child too).
"""

from __future__ import annotations

import functools
import json
import sys

from agent.sources.smart import DeviceSpec, _load_pysmart, read_devices, read_to_json, run_smartctl, spec_list


def reply(doc: object) -> None:
    print(json.dumps(doc), flush=True)


def main() -> int:
    request = json.load(sys.stdin)
    output = str(request.get("output", "text"))
    if output == "text":
        _load_pysmart()  # before the first reply, so its import is not charged to a device's time
    runner = functools.partial(run_smartctl, smartctl=str(request["smartctl"]))

    def listed(specs: list[DeviceSpec]) -> None:
        reply({"devices": [[s.name, s.type] for s in specs]})

    def starting(spec: DeviceSpec) -> None:
        reply({"reading": [spec.name, spec.type]})

    for read in read_devices(runner, spec_list(request["devices"]), float(request["timeout"]),
                             int(request["ts_ms"]), spec_list(request.get("skip", [])), listed, starting,
                             output=output):
        print(read_to_json(read), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
