#!/usr/bin/env bash
# Builds the two Debian packages:
#   dist/waystation-agent_<version>_<arch>.deb      /opt/waystation/agent, waystation-agent.service
#   dist/waystation-collector_<version>_<arch>.deb  /opt/waystation/collector, waystation-collector.service
# Each holds a virtual environment on Debian's own /usr/bin/python3 with the project and its
# dependencies pinned by packaging/constraints.txt. Needs only Debian packages (installed
# here when missing) and PyPI.
#
# Usage: scripts/build-debs.sh [--out DIR]      (default: dist/)
# Environment:
#   WAYSTATION_DEB_REVISION  the Debian revision, default 1: <version>-<revision>. Bump it to
#                            rebuild the same upstream version as an upgrade.
#   SOURCE_DATE_EPOCH        every timestamp in the packages (default: the last commit's time),
#                            so that two builds of one commit make the same files.

# The templates' @NAME@ values are read by name (fill, below), which shellcheck cannot see.
# shellcheck disable=SC2034
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

out=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-debs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build-debs.sh: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The venv runs on Debian's interpreter, whatever python3 comes first on PATH (pyenv, conda):
# its bin/python links to it, and the package depends on the Debian package that owns it.
[ -e /usr/bin/python3 ] || die "/usr/bin/python3 is missing: this builds on Debian or Ubuntu only"
python=$(readlink -f /usr/bin/python3)
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

missing=()
"$python" -c 'import venv, ensurepip' 2>/dev/null || missing+=("python$pyver-venv")
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v gzip >/dev/null || missing+=(gzip)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)   # the shared-library dependencies
command -v strip >/dev/null || missing+=(binutils)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The version has one home: pyproject.toml. PEP 440 pre-releases sort before the release in
# Debian only with a tilde (0.2.0rc1 -> 0.2.0~rc1).
upstream=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
"$python" -c "import sys; sys.exit(sys.version_info[:2] < (3, 11))" \
  || die "/usr/bin/python3 is $pyver; pyproject.toml requires >= 3.11"
debian_upstream=$(printf '%s' "$upstream" | sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g; s/\.post([0-9]+)/+post\1/')
revision=${WAYSTATION_DEB_REVISION:-1}
[[ "$revision" =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "WAYSTATION_DEB_REVISION=$revision: must start with a digit and hold only [A-Za-z0-9.+~]"
version="$debian_upstream-$revision"
dpkg --validate-version "$version" || die "pyproject.toml version $upstream gives no valid Debian version ($version)"
arch=$(dpkg --print-architecture)

git_rev=""
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  git_rev=$(git -C "$repo" rev-parse --short HEAD)
  git -C "$repo" diff --quiet HEAD -- agent collector wire pyproject.toml packaging || git_rev="$git_rev, with uncommitted changes"
  : "${SOURCE_DATE_EPOCH:=$(git -C "$repo" log -1 --format=%ct)}"
fi
: "${SOURCE_DATE_EPOCH:=$(stat -c %Y pyproject.toml)}"
export SOURCE_DATE_EPOCH
maintainer=$(sed -n 's/^Maintainer: //p' packaging/debian/maintainer)

work=$(mktemp -d /tmp/waystation-debs.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)

echo "== waystation $upstream -> Debian $version ($arch), Python $pyver"

# 1. The project as a wheel, built from a copy so the working tree gets no build/ or egg-info.
mkdir "$work/src" "$work/wheel"
cp -r pyproject.toml agent collector wire "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m venv "$work/venv"
stage="$work/venv"
pip=("$stage/bin/python" -m pip --disable-pip-version-check --no-input)
log="$work/pip.log"
"${pip[@]}" wheel -q --no-deps -w "$work/wheel" "$work/src" >"$log" 2>&1 \
  || { cat "$log" >&2; die "building the waystation wheel failed (pip output above)"; }

# 2. The venv, at a staging path: no byte-code (see postinst), dependencies as wheels only
# (no compiler, nothing built differently from one machine to the next).
"${pip[@]}" install -q --no-compile --only-binary=:all: -c packaging/constraints.txt "$work"/wheel/*.whl >"$log" 2>&1 \
  || { cat "$log" >&2; die "installing into the venv failed (pip output above)"; }
"${pip[@]}" freeze --exclude waystation | LC_ALL=C sort -f >"$work/python-pins.txt"
unpinned=$("$python" - "$work/python-pins.txt" packaging/constraints.txt <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = lambda path: {norm(l.split("==")[0]): l.strip() for l in open(path) if "==" in l and not l.startswith("#")}
installed, constrained = pins(sys.argv[1]), pins(sys.argv[2])
print(" ".join(line for name, line in sorted(installed.items()) if name not in constrained))
EOF
)
[ -z "$unpinned" ] || die "pip installed distributions packaging/constraints.txt does not pin: $unpinned (pin them there)"
# The installer is not shipped: nothing on a node installs into this venv.
"${pip[@]}" uninstall -q -y pip setuptools >"$log" 2>&1 || { cat "$log" >&2; die "removing pip from the venv failed"; }
# direct_url.json names the wheel's temporary path: the only record of where it came from.
find "$stage" -path '*/waystation-*.dist-info/direct_url.json' -delete
find "$stage" -path '*/waystation-*.dist-info/RECORD' -exec sed -i '/direct_url\.json/d' {} +
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
find "$stage" -name '*.pyc' -delete
# Wheels' extension modules carry symbols nothing here uses: stripped as dh_strip would.
# Files marked executable that are neither ELF nor scripts (protobuf's modules) lose the bit.
elf=$(printf '\177ELF')
while IFS= read -r -d '' f; do
  if [ "$(head -c4 "$f")" = "$elf" ]; then
    # Not the private libraries auditwheel put in <package>.libs (numpy's OpenBLAS): patchelf
    # rewrote their program headers, and strip would leave their segments misaligned.
    case "$f" in *.libs/*) ;; *.so|*.so.*) strip --remove-section=.comment --remove-section=.note --strip-unneeded "$f" ;; esac
  elif [ -x "$f" ] && [ "$(head -c2 "$f")" != '#!' ]; then
    chmod a-x "$f"
  fi
done < <(find "$stage/lib" -type f \( -name '*.so*' -o -perm /111 \) -print0)
# auditwheel's private libraries are shared libraries, not programs; numpy's own helper
# scripts are never run from here (and would want a python3 dependency if they were).
find "$stage/lib" -path '*.libs/*' -type f -exec chmod 0644 {} +
find "$stage/lib" -path '*/site-packages/numpy/*' -type f -name '*.py' -perm /111 -exec chmod a-x {} +
# What the extension modules link against (libc6, libstdc++6, ...), as dpkg-shlibdeps
# finds it for any Debian package; it wants a debian/control to stand in.
mkdir -p "$work/shlibs/debian"
printf 'Source: waystation\n\nPackage: waystation\nArchitecture: any\n' >"$work/shlibs/debian/control"
# Wheels repaired by auditwheel (numpy's) carry private copies of the libraries they need in
# a <package>.libs folder: found there (-l), and, coming from no Debian package, they add no
# dependency of their own (--ignore-missing-info); what they in turn need still counts.
mapfile -d '' sofiles < <(find "$stage/lib" -type f -name '*.so*' -print0)
libdirs=()
while IFS= read -r -d '' d; do libdirs+=("-l$d"); done < <(find "$stage/lib" -type d -name '*.libs' -print0)
shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O --ignore-missing-info "${libdirs[@]}" "${sofiles[@]}" 2>"$log") \
  || { cat "$log" >&2; die "dpkg-shlibdeps failed on the venv's extension modules (above)"; }
shlibs=${shlibs#shlibs:Depends=}
site_rel=lib/python$pyver/site-packages

# One package from the globals set below: PKG, PART, STATE_DIR, KEY, DOCS, DEPENDS, ...
build_package() {
  local final=/opt/waystation/$PART
  local root=$work/pkg-$PART
  local doc=$root/usr/share/doc/$PKG
  UNIT=$PKG.service VENV=$final

  mkdir -p "$root/opt/waystation" "$root/usr/bin" "$root/etc/waystation" "$root/lib/systemd/system" \
    "$root/usr/lib/sysusers.d" "$root/usr/share/lintian/overrides" "$doc" "$root/DEBIAN"
  # Venvs are not relocatable: every text file naming the staging path is rewritten to the
  # final one (script shebangs, pyvenv.cfg, activate), and then no file may name it at all.
  cp -a "$stage" "$root$final"
  { grep -rlIF -- "$stage" "$root$final" || true; } | while IFS= read -r f; do sed -i "s|$stage|$final|g" "$f"; done
  if grep -rlF -- "$work" "$root"; then die "$PKG: the files above still name the build directory $work"; fi
  "$python" packaging/debian/records.py "$root$final/$site_rel"

  ln -s "$final/bin/$PKG" "$root/usr/bin/$PKG"
  install -m 0644 "packaging/config/$PART.toml" "$root/etc/waystation/$PART.toml"
  install -m 0644 "packaging/systemd/$UNIT" "$root/lib/systemd/system/$UNIT"
  install -m 0644 packaging/debian/sysusers.conf "$root/usr/lib/sysusers.d/$PKG.conf"
  install -m 0644 "packaging/debian/$PKG.lintian-overrides" "$root/usr/share/lintian/overrides/$PKG"
  if [ -n "$UDEV_RULES" ]; then
    install -D -m 0644 "packaging/udev/$(basename "$UDEV_RULES")" "$root$UDEV_RULES"
  fi

  # Docs: policy 12.3 wants those over 4 KiB compressed; -n keeps timestamps out of gzip.
  local f
  for f in README.md docs/runbooks.md $DOCS; do
    install -m 0644 "$f" "$doc/$(basename "$f")"
    [ "$(stat -c %s "$f")" -le 4096 ] || gzip -9n "$doc/$(basename "$f")"
  done
  install -m 0644 "$work/python-pins.txt" "$doc/python-pins.txt"
  fill packaging/debian/changelog.in | gzip -9n >"$doc/changelog.Debian.gz"
  BUNDLED=$("$stage/bin/python" packaging/debian/bundled.py "$final/$site_rel")
  fill packaging/debian/copyright.in >"$doc/copyright"

  for f in postinst prerm postrm; do
    fill "packaging/debian/$f.in" >"$root/DEBIAN/$f"
    chmod 0755 "$root/DEBIAN/$f"
  done
  echo "/etc/waystation/$PART.toml" >"$root/DEBIAN/conffiles"

  # Same bytes, modes and times from one build to the next.
  chmod -R u+rwX,go+rX,go-w "$root"
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  INSTALLED_SIZE=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
  fill packaging/debian/control.in >"$root/DEBIAN/control"
  touch -d "@$SOURCE_DATE_EPOCH" "$root/DEBIAN/control"

  local deb="$out/${PKG}_${VERSION}_${ARCH}.deb"
  # xz -1: 12 MB in 7 s, where the default -6 takes 30 s per package for 1 MB less.
  dpkg-deb --root-owner-group -Zxz -z1 --build "$root" "$deb" >/dev/null
  echo "   $deb ($(du -h "$deb" | cut -f1))"
}

# @NAME@ placeholders -> the values of the shell variables of that name.
shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2 would put the match where '&' is
fill() {
  local text name
  text=$(cat "$1")
  for name in PKG UNIT PART STATE_DIR VENV KEY NEXT WHAT_STATE VERSION UPSTREAM_VERSION ARCH MAINTAINER \
              INSTALLED_SIZE DEPENDS SUMMARY DESCRIPTION PYVER GIT DATE BUNDLED UDEV_RULES; do
    text=${text//@$name@/${!name-}}
  done
  if [[ "$text" =~ @[A-Z_]+@ ]]; then die "$1: no value for ${BASH_REMATCH[0]}"; fi
  printf '%s\n' "$text"
}

VERSION=$version UPSTREAM_VERSION=$upstream ARCH=$arch MAINTAINER=$maintainer PYVER=$pyver
GIT=${git_rev:+ (git $git_rev)}
DATE=$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
common_depends="python$pyver, ${shlibs:+$shlibs, }systemd-sysusers | adduser"

PKG=waystation-agent PART=agent STATE_DIR=/var/lib/waystation-agent DOCS=""
UDEV_RULES=/lib/udev/rules.d/60-waystation-agent.rules   # NVMe controllers readable for SMART
KEY=$STATE_DIR/node.key
NEXT="runuser -u waystation -- waystation-agent keygen; enroll what it prints on the collector; systemctl start waystation-agent"
WHAT_STATE="The node key and the spool (batches not yet acknowledged are lost)"
DEPENDS="$common_depends, smartmontools"
SUMMARY="Waystation site agent: signed store-and-forward fleet telemetry"
DESCRIPTION=" Samples system, GPU (NVML), SMART, network and model-server metrics on a
 node, summarizes them into windows, signs every batch and keeps it in an
 on-disk spool until the Waystation collector acknowledges it.
 .
 Runs as the hardened systemd service waystation-agent.service, as the
 waystation user, from a private virtual environment in /opt/waystation/agent."
# The two packages share only the staged venv (read): built side by side, each in a subshell.
build_package &
agent_build=$!

PKG=waystation-collector PART=collector STATE_DIR=/var/lib/waystation-collector DOCS="docs/wire.md docs/bundle.md"
UDEV_RULES=""
KEY=$STATE_DIR/collector.key
NEXT="runuser -u waystation -- waystation-collector keygen --config /etc/waystation/collector.toml; systemctl start waystation-collector"
WHAT_STATE="The ledger (every batch received), the collector's key pairs and the enrolled node keys"
DEPENDS="$common_depends"
SUMMARY="Waystation collector: verifies, records and exposes fleet telemetry"
DESCRIPTION=" Verifies every batch Waystation agents send (signature, sequence, hash
 chain), records it durably in a SQLite ledger, exposes the fleet's newest
 state for Prometheus to scrape and forwards the whole history to
 Prometheus remote-write stores.
 .
 Runs as the hardened systemd service waystation-collector.service, as the
 waystation user, from a private virtual environment in
 /opt/waystation/collector."
build_package &
collector_build=$!
wait "$agent_build" || die "building waystation-agent failed (above)"
wait "$collector_build" || die "building waystation-collector failed (above)"
