"""The SMART reader child: `python -m agent.sources.smart_reader`, started by the smart source.

Reads a JSON request on stdin ({"smartctl", "timeout", "ts_ms", "devices": [[name, type]]},
no devices meaning a scan) and writes one JSON line per event on stdout:
`{"reading": [name, type]}` before a device is read, then `{"read": {...}}` with its
samples or error. pySMART is imported here, never in the agent (see agent/sources/smart.py).
"""

from __future__ import annotations

import functools
import json
import sys

from agent.sources.smart import DeviceSpec, read_devices, read_to_json, run_smartctl


def main() -> int:
    request = json.load(sys.stdin)
    runner = functools.partial(run_smartctl, smartctl=str(request["smartctl"]))
    configured = [DeviceSpec(str(name), str(dev_type)) for name, dev_type in request["devices"]]

    def starting(spec: DeviceSpec) -> None:
        print(json.dumps({"reading": [spec.name, spec.type]}), flush=True)

    for read in read_devices(runner, configured, float(request["timeout"]), int(request["ts_ms"]), starting):
        print(read_to_json(read), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
