#!/usr/bin/env bash
# Builds CRIU 4.x from Debian's source package and installs it where warren looks first:
#   /usr/local/lib/warren/criu/criu
# Debian 12's criu 3.17 fails on newer kernels ("Unexpected rt vDSO area bounds"), and Debian's
# containerd/runc may pull it into /usr/sbin; warren never uses a criu older than 4.
#
# The newer Debian release's deb-src line lives in a private apt directory (its own sources list
# and package lists), so the machine's apt sources and lists are left as they are. Idempotent:
# instant when the installed binary already reports the wanted major version.
#
#   scripts/install-criu.sh            build and install if missing
#   CRIU_VERSION=4.1.1-1 scripts/install-criu.sh   another Debian version of the package
set -euo pipefail

want_version="${CRIU_VERSION:-4.1.1-1}"
prefix="${WARREN_CRIU_PREFIX:-/usr/local/lib/warren/criu}"
work="${WARREN_CRIU_WORK:-/var/cache/warren-criu}"
suite="${CRIU_SUITE:-trixie}"

# Prints the major version of a criu binary ("4" for "Version: 4.1.1"), or nothing.
criu_major() {
  "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1
}

upstream="${want_version%%-*}"
if [ -x "$prefix/criu" ] && "$prefix/criu" --version 2>/dev/null | grep -qx "Version: $upstream"; then
  echo "install-criu: criu $upstream already at $prefix/criu"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-criu: needs root (apt-get and $prefix)" >&2
  exit 1
fi

# The build's dependencies (their runtime libraries stay installed for the binary), and what
# CRIU runs while dumping and restoring a network namespace (`ip`) and tmpfs mounts (`tar`).
# libprotobuf-dev holds google/protobuf/descriptor.proto, which the upstream tarball links to
# (protobuf-compiler only recommends it, and recommends are not installed here).
build_deps=(build-essential pkg-config xz-utils
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
  libnl-3-dev libnl-route-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev
  libnftables-dev uuid-dev libaio-dev iproute2 tar)
missing=()
for p in "${build_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-criu: installing build dependencies: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A private apt world holding only the newer release's sources.
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/sources.list.d"
cat >"$apt_dir/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
EOF
apt_private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::State::Lists=$apt_dir/lists")

src="$work/src"
rm -rf "$src"
mkdir -p "$src"
chmod 0755 "$work" "$src"
# apt downloads as _apt where it can (else it warns and downloads as root).
if id _apt >/dev/null 2>&1; then chown _apt "$src"; fi
echo "install-criu: fetching criu=$want_version from Debian $suite's sources"
apt-get "${apt_private[@]}" update -qq
# Some mirrors serve the upstream tarball but not the .dsc or Debian's patch tarball: the
# build needs only the first (Debian's patches are packaging), so go on without the rest.
(cd "$src" && apt-get "${apt_private[@]}" source --download-only "criu=$want_version") ||
  echo "install-criu: not every file of the source package was fetched; building from the upstream tarball"
orig="$src/criu_$upstream.orig.tar.xz"
if [ ! -f "$orig" ]; then
  echo "install-criu: criu_$upstream.orig.tar.xz was not downloaded into $src" >&2
  exit 1
fi
# apt checked the download against the signed Sources index; check again explicitly, so a file
# that came some other way is never built.
want_sha=$(apt-cache "${apt_private[@]}" showsrc criu |
  awk -v f="criu_$upstream.orig.tar.xz" -v v="$want_version" '
    /^Version:/ {ok = ($2 == v)} /^Checksums-Sha256:/ {c=1; next} /^[^ ]/ {c=0}
    ok && c && $3 == f {print $1; exit}')
got_sha=$(sha256sum "$orig" | cut -d' ' -f1)
if [ -z "$want_sha" ] || [ "$want_sha" != "$got_sha" ]; then
  echo "install-criu: $orig has sha256 $got_sha, the Sources index says '${want_sha:-nothing}'" >&2
  exit 1
fi
mkdir -p "$src/criu"
tar -xJf "$orig" -C "$src/criu" --strip-components=1
if [ -f "$src/criu_$want_version.debian.tar.xz" ]; then
  tar -xJf "$src/criu_$want_version.debian.tar.xz" -C "$src/criu"
  if [ -f "$src/criu/debian/patches/series" ]; then
    while read -r patch; do
      case "$patch" in "" | "#"*) continue ;; esac
      patch -d "$src/criu" -p1 -s <"$src/criu/debian/patches/$patch"
    done <"$src/criu/debian/patches/series"
  fi
fi

echo "install-criu: building (make criu)"
make -C "$src/criu" -j"$(nproc)" criu >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  echo "install-criu: the build failed; the whole log is $work/build.log" >&2
  exit 1
}

mkdir -p "$prefix"
install -m 0755 "$src/criu/criu/criu" "$prefix/criu.new"
mv -f "$prefix/criu.new" "$prefix/criu"
major=$(criu_major "$prefix/criu")
if [ "${major:-0}" -lt 4 ]; then
  echo "install-criu: $prefix/criu reports version '${major:-none}', not 4 or later" >&2
  exit 1
fi
rm -rf "$src"
echo "install-criu: installed $("$prefix/criu" --version | head -n1) at $prefix/criu"
"$prefix/criu" check || echo "install-criu: note: 'criu check' reported missing features (see above)" >&2
