"""`waystation-agent run` with its GPUs answered from recorded nvidia-smi XML, for e2e tests.

Everything is the real agent (tests/fakes/nvml.py's FakeNvml stands in for the NVML module,
as in bench/agent_fixture_run.py); SMART goes through the smartctl the config names (e.g.
tests/fakes/smartctl-replay with SMARTCTL_REPLAY in the environment). On top of that run,
`--xid GPU:XID:AFTER_S` raises NVML critical-error event XID on GPU index GPU once, AFTER_S
seconds after the agent started (repeatable): a GPU that fails while the agent watches it.

    python tests/fakes/recorded_agent.py --config agent.toml [--xid 0:79:8] [--gpus a10g.xml ...]

SIGTERM stops the agent as systemd would (it flushes and exits 0).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent import keys  # noqa: E402
from agent.config import load_agent_config  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.sources.base import SourceEnv  # noqa: E402
from tests.fakes.nvml import XMLS, FakeNvml, load  # noqa: E402

log = logging.getLogger("waystation.recorded_agent")


def xid_spec(text: str) -> tuple[int, int, float]:
    """GPU:XID:AFTER_S -> (gpu index, xid, seconds)."""
    try:
        gpu, xid, after = text.split(":")
        spec = int(gpu), int(xid), float(after)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not GPU:XID:AFTER_S (e.g. 0:79:8)") from None
    if spec[0] < 0 or spec[1] <= 0 or spec[2] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU >= 0, XID > 0, AFTER_S >= 0")
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--gpus", nargs="+", default=list(XMLS),
                    help="nvidia-smi XML recordings (in ../shared/fixtures/nvidia-smi) whose GPUs the node has")
    ap.add_argument("--xid", type=xid_spec, action="append", default=[], metavar="GPU:XID:AFTER_S",
                    help="raise XID on GPU index GPU after AFTER_S seconds (repeatable)")
    args = ap.parse_args()
    config = load_agent_config(args.config)
    nvml = FakeNvml(*load(*args.gpus))
    for gpu, _, _ in args.xid:
        if gpu >= len(nvml.handles):
            ap.error(f"--xid: GPU {gpu} not in the recordings ({len(nvml.handles)} GPUs)")
    agent = Agent(config, keys.load(config.key_path), SourceEnv(extra={"nvml": nvml}))

    timers = []
    for gpu, xid, after in args.xid:
        def inject(gpu: int = gpu, xid: int = xid) -> None:
            log.warning("recorded_agent: injecting XID %d on GPU %d", xid, gpu)
            nvml.inject_xid(gpu, xid)

        timer = threading.Timer(after, inject)
        timer.daemon = True
        timers.append(timer)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=agent.stop_event.set).start())
    for timer in timers:
        timer.start()
    try:
        agent.run()
    finally:
        for timer in timers:
            timer.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
