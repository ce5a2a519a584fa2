"""Root writing into a service user's state: the files it makes would lock the service out.

The packaged daemons run as `waystation` and own their state folders. A command run by root
that writes there (a key, the ledger, a spool) leaves root-owned files the service cannot
read or write: the service then fails at its next start, far from the command that caused
it. Both CLIs refuse that up front and say how to run the command instead."""

from __future__ import annotations

import os
import pwd
from pathlib import Path


def root_in_foreign_state(folder: Path) -> str | None:
    """Why root must not write into `folder`, or None (not root, no such folder, root's own)."""
    if os.geteuid() != 0:
        return None
    try:
        owner = folder.stat().st_uid
    except OSError:
        return None
    if owner == 0:
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (f"{folder} belongs to {name}, and files root makes there would be unreadable to the service: "
            f"run this as {name} (e.g. `runuser -u {name} -- <this command>`)")
