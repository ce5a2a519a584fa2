"""Rewrite the RECORD files of a venv's site-packages for the files as they are shipped.

pip's RECORD lists each installed file with its sha256 and size. The build changes some of
them after pip is done (shebangs rewritten to the final path, extension modules stripped),
so their entries would name bytes no one ships, and the shebangs' hashes would carry the
random staging path from one build to the next. Usage: python3 records.py SITE_PACKAGES
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
from pathlib import Path


def digest(path: Path) -> str:
    raw = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def main() -> int:
    site = Path(sys.argv[1])
    for record in sorted(site.glob("*.dist-info/RECORD")):
        rows = list(csv.reader(io.StringIO(record.read_text(encoding="utf-8"))))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in rows:
            if len(row) == 3 and row[1]:  # files pip hashed; RECORD itself and .pyc have none
                path = site / row[0]
                if path.is_file():
                    row = [row[0], digest(path), str(path.stat().st_size)]
            writer.writerow(row)
        record.write_text(out.getvalue(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
