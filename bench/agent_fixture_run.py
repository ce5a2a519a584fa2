"""`waystation-agent run` with the GPU answered from recorded fixtures.

These machines have no NVIDIA GPU, so for measuring the agent with every source enabled
the NVML module is the recorded-data stand-in the tests use (tests/fakes/nvml.py);
everything else is the real agent. (SMART needs no stand-in here: its reads run in a
child process whose smartctl the config names, tests/fakes/smartctl-replay.)

    python bench/agent_fixture_run.py --config agent.toml
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent import keys  # noqa: E402
from agent.config import load_agent_config  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.sources.base import SourceEnv  # noqa: E402
from tests.fakes.nvml import XMLS, FakeNvml, load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    args = ap.parse_args()
    config = load_agent_config(args.config)
    env = SourceEnv(extra={"nvml": FakeNvml(*load(*XMLS))})
    agent = Agent(config, keys.load(config.key_path), env)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=agent.stop_event.set).start())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
