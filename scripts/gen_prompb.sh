#!/usr/bin/env bash
# Regenerates collector/prompb/remote_write_pb2.py and .pyi from remote_write.proto.
#
# The generator is pinned to protoc 3.21.x (Python gencode "4.21"): its output
# only calls runtime APIs that every protobuf runtime from 4.21 up to 7.x has
# (builder.BuildMessageAndEnumDescriptors / BuildTopDescriptorsAndMessages) and,
# unlike protoc >= 26 output, no runtime_version check that would demand a
# runtime at least as new as protoc. 3.21.6 and 3.21.12 give identical output.
#
# Either of:
#   apt-get install protobuf-compiler          # Debian 12 (bookworm): protoc 3.21.12
#   python3 -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.53.2 \
#     && PROTOC="/tmp/gt/bin/python -m grpc_tools.protoc" scripts/gen_prompb.sh
#
# The exact command, run from the repository root, is:
#   protoc -I . --python_out=. --pyi_out=. collector/prompb/remote_write.proto
# (-I . makes the descriptor's file name collector/prompb/remote_write.proto, unique
# in the process-wide descriptor pool, and the module name collector.prompb.remote_write_pb2.)
# followed by putting "# ruff: noqa" and "# mypy: ignore-errors" near the top of both
# outputs: protoc's code is neither ruff-clean nor --strict-clean, and marking the
# files themselves keeps them out of `ruff check collector` / `mypy --strict collector`
# without per-path config. mypy still reads the .pyi's types for callers.
# OUT=dir writes there instead of in place (the regeneration test uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

protoc_cmd=${PROTOC:-protoc}
version=$($protoc_cmd --version)
case "$version" in
  "libprotoc 3.21."*) ;;
  *) echo "gen_prompb.sh: need protoc 3.21.x, got '$version' (see the header of this script)" >&2; exit 1 ;;
esac

out=${OUT:-.}
$protoc_cmd -I . --python_out="$out" --pyi_out="$out" collector/prompb/remote_write.proto
marks='# ruff: noqa\n# mypy: ignore-errors'
sed -i "1a $marks" "$out/collector/prompb/remote_write_pb2.py"    # after the coding line
sed -i "1i $marks" "$out/collector/prompb/remote_write_pb2.pyi"
