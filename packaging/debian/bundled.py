"""Print the copyright file's section on the Python distributions a venv bundles.

Run with the venv's own interpreter (scripts/build-debs.sh does): it lists each installed
distribution with its version, its declared licence and where its licence files lie in
the installed package, so the copyright file matches what was shipped, not a hand-kept list.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

# Licences whose full text Debian ships in /usr/share/common-licenses: policy 12.5 wants a
# pointer there rather than a copy.
COMMON = {
    "Apache-2.0": "/usr/share/common-licenses/Apache-2.0",
    "LGPL-2.1-or-later": "/usr/share/common-licenses/LGPL-2.1",
}


def licence(dist: md.Distribution) -> str:
    meta = dist.metadata
    text = meta.get("License-Expression") or (meta.get("License") or "").strip()
    if not text or len(text) > 60 or "\n" in text:  # some put the whole licence text here
        classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        text = ", ".join(classifiers) or "see its licence files"
    return text


def main() -> int:
    site = sys.argv[1]  # the site-packages path as installed, e.g. /opt/waystation/agent/lib/python3.11/site-packages
    own = {"waystation"}
    dists = sorted((d for d in md.distributions() if d.metadata["Name"].lower() not in own),
                   key=lambda d: d.metadata["Name"].lower())
    for d in dists:
        name, version, lic = d.metadata["Name"], d.version, licence(d)
        files = [str(f) for f in d.files or [] if any(k in f.name.upper() for k in ("LICEN", "COPYING", "NOTICE"))]
        print(f"{name} {version}")
        print(f"  Licence: {lic}")
        for key, path in COMMON.items():
            if key in lic:
                print(f"  The {key} text: {path}")
        for f in files:
            print(f"  {site}/{f}")
        if not files:
            print("  (the distribution ships no licence file; its licence is as declared above)")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
