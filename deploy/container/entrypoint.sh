#!/bin/sh
# The container's entrypoint: bcc compiles against the headers it finds in
# /lib/modules/$(uname -r)/{build,source}. The image cannot know the node's
# kernel, so it carries the Debian headers deploy/setup.sh picked at build
# time and links them for whatever kernel it starts on. Near headers do:
# every kernel struct offset the program uses comes from the node's BTF
# (/sys/kernel/btf/vmlinux), or, without BTF, the classic tracepoint's
# record is read instead. Headers mounted from the host take precedence. Then it runs tcpstate with the container's args.
set -eu
release=$(uname -r)
modules=${TCPSTATE_MODULES_DIR:-/lib/modules}/$release
if [ ! -d "$modules/build/include/generated" ]; then
  arch=$(dpkg --print-architecture)
  build=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n 1)
  if [ -n "$build" ]; then
    mkdir -p "$modules"
    ln -sfn "$build" "$modules/build"
    ln -sfn "${build%-"$arch"}-common" "$modules/source"
    echo "tcpstate-entrypoint: kernel $release: using the image's headers ${build#/usr/src/}" >&2
  fi
fi
exec tcpstate "$@"
