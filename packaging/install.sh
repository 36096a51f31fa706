#!/bin/sh
# Lay out a wanmotion installation (used by `make install` and `make dist`).
#
#   packaging/install.sh [--build] BINDIR DESTDIR
#
# BINDIR holds the built wanmotion binary and the backend binaries
# (wanmotion-storage-*, wanmotion-network-*); --build builds them there
# first ($GO, default go; $VERSION is linked in). DESTDIR is the root to
# install under ("" or / for the running system). Layout:
#
#   /usr/lib/wanmotion/wanmotion                   the binary
#   /usr/bin/wanmotion -> /usr/lib/wanmotion/wanmotion
#   /opt/wanmotion/plugins/wanmotion-{storage,network}-*   backends
#   /etc/xapi.d/plugins/wanmotion -> /usr/lib/wanmotion/wanmotion   host plugin
#   /etc/xapi.d/vm-pre-migrate/50wanmotion          xenopsd hooks
#   /etc/xapi.d/vm-post-migrate/50wanmotion
#   /etc/wanmotion/wanmotion.conf                   kept if it exists
#   /usr/share/wanmotion/xencenter/WanMotion/WanMotion.xcplugin.xml
#   /usr/share/wanmotion/xencenter/wanmotion-xencenter.exe   (Windows, for XenCenter)
#   /usr/share/doc/wanmotion/operator-guide.md
set -eu

build=0
if [ "${1:-}" = "--build" ]; then build=1; shift; fi
if [ $# -ne 2 ]; then
	echo "usage: $0 [--build] BINDIR DESTDIR" >&2
	exit 2
fi
bindir=$1
dest=${2%/}
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
libexec=/usr/lib/wanmotion
plugins=/opt/wanmotion/plugins

if [ "$build" = 1 ]; then
	GO=${GO:-go}
	VERSION=${VERSION:-dev}
	mkdir -p "$bindir"
	(cd "$top" && "$GO" build -ldflags "-X main.version=$VERSION" -o "$bindir/wanmotion" ./cmd/wanmotion)
	for d in "$top"/storage-backends/*/cmd/* "$top"/network-backends/*/cmd/*; do
		[ -d "$d" ] || continue
		name=$(basename "$d")
		case "$name" in wanmotion-storage-*|wanmotion-network-*) ;; *) continue ;; esac
		(cd "$top" && "$GO" build -o "$bindir/$name" "./${d#"$top"/}")
	done
	# The XenCenter menu item runs on Windows.
	(cd "$top" && GOOS=windows GOARCH=amd64 "$GO" build -ldflags "-X main.version=$VERSION" \
		-o "$bindir/wanmotion-xencenter.exe" ./cmd/wanmotion-xencenter)
fi

[ -x "$bindir/wanmotion" ] || { echo "$0: $bindir/wanmotion is missing (build first, or pass --build)" >&2; exit 1; }

install -d -m 0755 "$dest$libexec" "$dest/usr/bin" "$dest$plugins" \
	"$dest/etc/xapi.d/plugins" "$dest/etc/xapi.d/vm-pre-migrate" "$dest/etc/xapi.d/vm-post-migrate" \
	"$dest/etc/wanmotion" "$dest/usr/share/wanmotion/xencenter/WanMotion" "$dest/usr/share/doc/wanmotion"
install -m 0755 "$bindir/wanmotion" "$dest$libexec/wanmotion"
ln -sfn "$libexec/wanmotion" "$dest/usr/bin/wanmotion"

found=0
for b in "$bindir"/wanmotion-storage-* "$bindir"/wanmotion-network-*; do
	[ -f "$b" ] && [ -x "$b" ] || continue
	install -m 0755 "$b" "$dest$plugins/$(basename "$b")"
	found=$((found + 1))
done
[ "$found" -gt 0 ] || echo "$0: warning: no backend binaries in $bindir" >&2

# The host plugin is the binary itself: xapi runs it with argv[0] =
# /etc/xapi.d/plugins/wanmotion, which is how it finds the host's etc.
ln -sfn "$libexec/wanmotion" "$dest/etc/xapi.d/plugins/wanmotion"

for hook in vm-pre-migrate vm-post-migrate; do
	sed -e "s|@BIN@|$libexec/wanmotion|g" -e "s|@HOOK@|$hook|g" "$here/hook.sh.in" > "$dest/etc/xapi.d/$hook/50wanmotion.tmp"
	chmod 0755 "$dest/etc/xapi.d/$hook/50wanmotion.tmp"
	mv -f "$dest/etc/xapi.d/$hook/50wanmotion.tmp" "$dest/etc/xapi.d/$hook/50wanmotion"
done

if [ ! -e "$dest/etc/wanmotion/wanmotion.conf" ]; then
	install -m 0644 "$here/wanmotion.conf" "$dest/etc/wanmotion/wanmotion.conf"
fi
install -m 0644 "$here/xencenter/WanMotion/WanMotion.xcplugin.xml" "$dest/usr/share/wanmotion/xencenter/WanMotion/WanMotion.xcplugin.xml"
if [ -f "$bindir/wanmotion-xencenter.exe" ]; then
	install -m 0644 "$bindir/wanmotion-xencenter.exe" "$dest/usr/share/wanmotion/xencenter/wanmotion-xencenter.exe"
fi
install -m 0644 "$top/docs/operator-guide.md" "$dest/usr/share/doc/wanmotion/operator-guide.md" 2>/dev/null || true
echo "wanmotion installed under ${dest:-/}"
