#!/usr/bin/env bash
# Fetches the Debian kernels that `make test-kernels` boots (tests/vm/):
# Debian 12's own 6.1 and Debian's 6.12, each image with its headers,
# unpacked into $TCPSTATE_KERNEL_CACHE (default /var/cache/tcpstate/kernels)
# as RELEASE/root/{boot,lib/modules,usr/src}. Idempotent: a release already
# unpacked is not downloaded again. Called by `deploy/setup.sh kernels`.
#
# The packages are downloaded and unpacked, never installed: a kernel
# package's hooks would rebuild the host's initramfs and boot entries.
set -euo pipefail

cache=${TCPSTATE_KERNEL_CACHE:-/var/cache/tcpstate/kernels}
arch=$(dpkg --print-architecture)
say() { echo "fetch-kernels: $*"; }

# The meta-packages that name the current kernel of each series.
series_packages=("linux-image-$arch" "linux-image-6.12-$arch")

apt_updated=
candidate_field() { # PACKAGE FIELD: the field of the candidate version
  apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -1
}
resolve() { # meta-package -> the kernel release it depends on, e.g. 6.1.0-57-amd64
  local depends
  depends=$(candidate_field "$1" Depends)
  if [ -z "$depends" ] && [ -z "$apt_updated" ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
    depends=$(candidate_field "$1" Depends)
  fi
  echo "$depends" | tr ',|' '\n\n' | sed -nE "s/^ *linux-image-([^ ]+-$arch)( .*)?$/\1/p" | head -1
}

releases=()
for meta in "${series_packages[@]}"; do
  release=$(resolve "$meta")
  if [ -z "$release" ]; then
    echo "fetch-kernels: no kernel found through $meta (apt-cache show $meta)" >&2
    exit 5
  fi
  releases+=("$release")
done

mkdir -p "$cache"
for release in "${releases[@]}"; do
  home=$cache/$release
  if [ -f "$home/complete" ]; then
    say "present: $home"
    continue
  fi
  headers=linux-headers-$release
  # the -common package the headers depend on holds most of them
  common=$(candidate_field "$headers" Depends | tr ',' '\n' |
    sed -nE 's/^ *(linux-headers-[^ ]+-common)( .*)?$/\1/p' | head -1)
  packages=("linux-image-$release-unsigned" "$headers" "$common")
  rm -rf "$home"
  mkdir -p "$home/debs"
  say "apt-get download ${packages[*]}"
  # _apt cannot write to root's directories: download as root, quietly
  if ! (cd "$home/debs" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}"); then
    if [ -n "$apt_updated" ]; then exit 6; fi
    say "apt-get update, then again"  # the lists may name a version the mirror dropped
    apt-get update -qq
    apt_updated=1
    (cd "$home/debs" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}")
  fi
  for deb in "$home"/debs/*.deb; do
    dpkg-deb -x "$deb" "$home/root"
  done
  modules=$home/root/lib/modules/$release
  # The packages point build and source at /usr/src on the host, where
  # nothing is installed: point them at the unpacked headers instead (the
  # guest sees the host's file system, so absolute host paths work there).
  ln -sfn "$home/root/usr/src/$headers" "$modules/build"
  ln -sfn "$home/root/usr/src/${common}" "$modules/source"
  depmod -b "$home/root" "$release"
  rm -rf "$home/debs"
  touch "$home/complete"
  say "unpacked $release into $home ($(du -sh "$home" | cut -f1))"
done

# Releases of earlier runs that are no longer current
for home in "$cache"/*/; do
  home=${home%/}
  [[ " ${releases[*]} " == *" $(basename "$home") "* ]] && continue
  say "removing $home (no longer current)"
  rm -rf "$home"
done
