#!/usr/bin/env bash
# Installs what tcpstate needs on Debian 12, idempotently, saying what it does.
#   deploy/setup.sh run    what `tcpstate serve` needs (also the container's recipe)
#   deploy/setup.sh test   that, plus what the tests and benchmarks need
#   deploy/setup.sh system like run, without the project's venv (containers)
#   deploy/setup.sh kernels like test, plus QEMU, virtme-ng and the kernels
#                          that `make test-kernels` boots (deploy/fetch-kernels.sh)
# Must run as root: it installs packages, links kernel headers, mounts tracefs.
set -euo pipefail

mode=${1:-run}
case "$mode" in run | test | system | kernels) ;; *)
  echo "usage: $0 [run|test|system|kernels]" >&2
  exit 2
  ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "setup: $*"; }
testing=  # what the tests need, too
case "$mode" in test | kernels) testing=1 ;; esac

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (it installs packages and mounts tracefs):" \
    "run \`su -c 'make ${MAKE_TARGET:-run}'\` or use a root shell" >&2
  exit 3
fi

# ---- Debian packages -------------------------------------------------------
packages=(python3-bpfcc python3-venv python3-pip iproute2 kmod)
if [ -n "$testing" ]; then
  packages+=(prometheus bpftool bpfcc-tools prometheus-node-exporter procps curl gcc libc6-dev)
  # the deployment tests: systemd-analyze, systemd-nspawn, strace
  packages+=(systemd systemd-container strace)
  # the Prometheus Operator schema check runs on node; any node >= 18 will do
  command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
  # bench/: bcc's tcpstates compiles only against Debian 12's own 6.1 headers
  packages+=("linux-headers-$(dpkg --print-architecture)")
fi
if [ "$mode" = kernels ]; then
  # virtme-ng boots the kernels with QEMU (TCG) and builds its initramfs
  # with busybox; it reads a kernel image's release with file
  packages+=(qemu-system-x86 busybox-static file)
fi
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
  # Debian starts the services it installs where systemd runs; tcpstate's
  # tests start their own Prometheus and node_exporter on private ports.
  for service in prometheus prometheus-node-exporter; do
    if [[ " ${missing[*]} " == *" $service "* ]] && command -v systemctl >/dev/null &&
      systemctl is-active --quiet "$service" 2>/dev/null; then
      systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
  done
else
  say "Debian packages present: ${packages[*]}"
fi

# ---- kernel headers for bcc ---------------------------------------------------
release=$(uname -r)
modules=/lib/modules/$release
if [ -f "$modules/source/include/linux/kconfig.h" ] && [ -d "$modules/build/include/generated" ]; then
  say "kernel headers present in $modules"
else
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1 ||
    { [ -z "$apt_updated" ] && apt-get update -qq && apt_updated=1 &&
      apt-cache show "linux-headers-$release" >/dev/null 2>&1; }; then
    apt_install "linux-headers-$release"
  else
    arch=$(dpkg --print-architecture)
    running=$(echo "$release" | grep -oE '^[0-9]+\.[0-9]+(\.[0-9]+)?')
    # The nearest Debian headers: the newest of the running kernel's major
    # version or older; else the oldest newer one.
    candidates=$(apt-cache pkgnames linux-headers- |
      grep -E "^linux-headers-[0-9][0-9.]*[-+][^-]*-${arch}\$" | sort -V)
    pick=""
    for candidate in $candidates; do
      version=$(echo "$candidate" | sed -E 's/^linux-headers-([0-9.]+).*/\1/')
      if [ "$(printf '%s\n%s\n' "$version" "$running" | sort -V | head -1)" = "$version" ]; then
        pick=$candidate
      fi
    done
    [ -n "$pick" ] || pick=$(echo "$candidates" | head -1)
    if [ -z "$pick" ]; then
      echo "setup: no linux-headers package found for $release or near it" >&2
      exit 5
    fi
    flavour=${pick#linux-headers-}
    common=${flavour%-"$arch"}-common
    # Downloaded and unpacked, not installed: the headers package depends on
    # its kernel image, whose hooks would rebuild the initramfs.
    unpacked=/var/cache/tcpstate/headers/$flavour
    if [ ! -f "$unpacked/complete" ]; then
      rm -rf "$unpacked"
      mkdir -p "$unpacked/debs"
      say "apt-get download $pick linux-headers-$common (unpacked into $unpacked)"
      (cd "$unpacked/debs" &&
        apt-get download -qq -o APT::Sandbox::User=root "$pick" "linux-headers-$common")
      for deb in "$unpacked"/debs/*.deb; do
        dpkg-deb -x "$deb" "$unpacked/root"
      done
      rm -rf "$unpacked/debs"
      touch "$unpacked/complete"
    fi
    mkdir -p "$modules"
    ln -sfn "$unpacked/root/usr/src/linux-headers-$flavour" "$modules/build"
    ln -sfn "$unpacked/root/usr/src/linux-headers-$common" "$modules/source"
    echo "setup: WARNING: no headers package for kernel $release; linked the nearest," \
      "$pick, as $modules/build and source (tcpstate reads no kernel struct by offset)"
  fi
fi

# ---- tracefs -------------------------------------------------------------------
# An image build (deploy/container/Containerfile) cannot mount it: the
# container gets the host's tracefs at run time.
if [ -n "${TCPSTATE_IMAGE_BUILD:-}" ]; then
  say "image build: tracefs comes from the host at run time"
elif [ -d /sys/kernel/tracing/events ]; then
  say "tracefs mounted at /sys/kernel/tracing"
else
  say "mount -t tracefs tracefs /sys/kernel/tracing"
  mount -t tracefs tracefs /sys/kernel/tracing
fi

[ "$mode" = system ] && exit 0

# ---- the project's venv ------------------------------------------------------------
venv=$here/.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import bcc" 2>/dev/null; then
  say "/usr/bin/python3 -m venv --system-site-packages $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extras=""
[ "$mode" = test ] && extras="[test]"
[ "$mode" = kernels ] && extras="[test,vm]"
stamp=$venv/.installed$extras
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ] || [ ! -x "$venv/bin/tcpstate" ]; then
  say "pip install -e .$extras"
  if ! "$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extras" \
    >"$venv/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$venv/pip.log" >&2
    echo "setup: pip install failed (log: $venv/pip.log)" >&2
    exit 1
  fi
  "$venv/bin/tcpstate" --version >/dev/null
  touch "$stamp"
else
  say "venv up to date: $venv"
fi

if [ -n "$testing" ]; then
  validator=$here/deploy/kubernetes/validate
  if [ ! -d "$validator/node_modules/@kubernetes-models/prometheus-operator" ]; then
    say "npm ci --prefix $validator"
    npm ci --no-audit --no-fund --prefix "$validator" >/dev/null
  else
    say "node modules present in $validator"
  fi
fi

if [ "$mode" = kernels ]; then
  "$here/deploy/fetch-kernels.sh"
fi
